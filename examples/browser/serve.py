"""Serve the browser chat page, transformers.js and one or more ONNX export folders from this machine.

    python examples/browser/serve.py EXPORT_FOLDER [EXPORT_FOLDER ...] [--port 8000] [--node-modules DIR]

Nothing is fetched from a CDN or the Hub: every file the page needs comes from here.

    /                     index.html, chat.js (this folder)
    /transformers/        @huggingface/transformers/dist/ (the browser bundle, onnxruntime-web inside)
    /ort/                 onnxruntime-web/dist/ (its .wasm and .mjs files, loaded at run time)
    /models/NAME/         each export folder, NAME being its folder name
    /models.json          {"NAME": ["model.onnx", "model_q4.onnx", ...], ...}: the folders and their graphs

node_modules comes from --node-modules, else ./node_modules beside this script (`npm install` here), else the
peers' node project that benchmarks/peers/setup_peers.sh makes ($QWEN_MLX_PEERS/node, default /work/venvs/node).
The first line printed is the page's URL. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "chat.js")


class ServeError(Exception):
    """Bad input: reported as one `error: ...` line."""


def find_node_modules(explicit: str | None) -> Path:
    """The node_modules folder holding @huggingface/transformers."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        peers = Path(os.environ.get("QWEN_MLX_PEERS", "/work/venvs"))
        candidates = [HERE / "node_modules", peers / "node" / "node_modules"]
    for folder in candidates:
        if (folder / "@huggingface" / "transformers" / "package.json").is_file():
            return folder.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ServeError(f"no @huggingface/transformers in {tried} (run `npm install` in {HERE}, "
                     "or `bash benchmarks/peers/setup_peers.sh` and set QWEN_MLX_PEERS)")


def library_mounts(node_modules: Path) -> dict[str, Path]:
    """/transformers/ and /ort/, after checking that the onnxruntime-web on disk is the one the bundle was
    built against: its wasm files must match the JavaScript glue compiled into transformers.js."""
    tjs = node_modules / "@huggingface" / "transformers"
    wanted = json.loads((tjs / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    for ort in (tjs / "node_modules" / "onnxruntime-web", node_modules / "onnxruntime-web"):  # npm's lookup order
        if (ort / "package.json").is_file():
            break
    else:
        raise ServeError(f"onnxruntime-web is not installed beside {tjs}")
    found = json.loads((ort / "package.json").read_text())["version"]
    if found != wanted:
        raise ServeError(f"{ort} is version {found}, but transformers.js was built against {wanted}")
    for path in (tjs / "dist" / "transformers.min.js", ort / "dist"):
        if not path.exists():
            raise ServeError(f"{path} is missing (reinstall the npm packages)")
    return {"/transformers/": tjs / "dist", "/ort/": ort / "dist"}


def model_mounts(folders: list[str]) -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for arg in folders:
        folder = Path(arg).expanduser().resolve()
        if not (folder / "config.json").is_file() or not (folder / "onnx").is_dir():
            raise ServeError(f"{arg} is not an ONNX export folder (no config.json and onnx/; "
                             "make one with `python cli.py export-onnx`)")
        prefix = f"/models/{folder.name}/"
        if prefix in mounts:
            raise ServeError(f"two export folders are named {folder.name!r}; rename one")
        mounts[prefix] = folder
    return mounts


def manifest(mounts: dict[str, Path]) -> dict[str, list[str]]:
    """/models.json: each export folder's name and the graphs in its onnx/ (read per request: a re-export
    while the server runs shows up)."""
    return {prefix.split("/")[2]: sorted(f.name for f in (folder / "onnx").glob("*.onnx"))
            for prefix, folder in mounts.items() if prefix.startswith("/models/")}


class Handler(SimpleHTTPRequestHandler):
    """Static files from a few mounted folders; no directory listings, no caching, cross-origin isolated."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".onnx_data": "application/octet-stream"}

    def __init__(self, *args, mounts: dict[str, Path], quiet: bool, **kwargs):
        self.mounts, self.quiet = mounts, quiet
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        path = posixpath.normpath(unquote(urlsplit(path).path))  # folds "..", so no mount can be escaped
        for prefix in sorted(self.mounts, key=len, reverse=True):
            if (path + "/").startswith(prefix):
                root = self.mounts[prefix]
                target = root.joinpath(*[p for p in path[len(prefix):].split("/") if p])
                return str(target) if target.is_file() else ""
        name = path.lstrip("/") or "index.html"
        return str(HERE / name) if name in PAGE_FILES else ""

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/models.json":
            body = json.dumps(manifest(self.mounts)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
        elif not self.translate_path(self.path):
            self.send_error(404)
        elif head:
            super().do_HEAD()
        else:
            super().do_GET()

    def end_headers(self) -> None:
        # Cross-origin isolation lets onnxruntime-web use SharedArrayBuffer, i.e. more than one wasm thread.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        # A re-exported folder under the same name must not be answered from the browser's cache.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        if not self.quiet:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A browser that drops a download it no longer needs (a reload, a closed tab) is not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def make_server(folders: list[str], host: str = "127.0.0.1", port: int = 8000,
                node_modules: str | None = None, quiet: bool = True) -> Server:
    models = model_mounts(folders)  # the user's input first: its mistakes are the likelier ones
    mounts = {**library_mounts(find_node_modules(node_modules)), **models}
    server = Server((host, port), partial(Handler, mounts=mounts, quiet=quiet))
    server.model_names = list(manifest(mounts))  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", metavar="EXPORT_FOLDER", help="folder written by `cli.py export-onnx`")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    ap.add_argument("--node-modules", help="node_modules folder holding @huggingface/transformers")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    try:
        server = make_server(args.folders, args.host, args.port, args.node_modules, quiet=not args.verbose)
    except (ServeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"http://{host}:{port}/?model={server.model_names[0]}", flush=True)  # type: ignore[attr-defined]
    print("Ctrl-C stops the server", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
