"""The browser example (examples/browser/) in a real headless Chromium: the page loads an export folder with
transformers.js and onnxruntime-web (wasm), every file served from 127.0.0.1 by examples/browser/serve.py,
and its greedy reply has the same token ids as our own ONNX backend on the same folder.

Needs Debian's chromium (/usr/bin/chromium, or $QWEN_MLX_CHROMIUM), the `playwright` Python package (it
drives that browser; it downloads none) and the peers' node project with @huggingface/transformers
($QWEN_MLX_PEERS/node, made by benchmarks/peers/setup_peers.sh). Without one of them these tests skip with the
reason, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from benchmarks.peers import edge_runtimes as er  # standard library only at import time
from tests.support.chromium import chromium, unavailable

REPO = Path(__file__).resolve().parents[1]

SERVE = REPO / "examples" / "browser" / "serve.py"
N_TOKENS = 12
PAGE_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile, driven by Playwright."""
    reason = er.missing_reason("transformersjs")
    if reason:
        unavailable(reason)
    with chromium(tmp_path_factory.mktemp("chromium-profile"), viewport={"width": 1000, "height": 640}) as context:
        yield context


@contextmanager
def serving(*folders: Path):
    """examples/browser/serve.py on a free port of 127.0.0.1; yields its base URL and stops it after."""
    proc = subprocess.Popen([sys.executable, str(SERVE), *map(str, folders), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QWEN_MLX_PEERS": str(er.peers_root())})
    try:
        timer = threading.Timer(60, proc.kill)  # a server that never prints its URL must not hang the test
        timer.start()
        line = proc.stdout.readline().strip()
        timer.cancel()
        if not line.startswith("http://127.0.0.1:"):
            proc.kill()
            pytest.fail(f"serve.py did not start: {line}{proc.stderr.read()}")
        parts = urlsplit(line)
        yield f"{parts.scheme}://{parts.netloc}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_in_page(context, base: str, query: dict, screenshot: Path | None = None) -> dict:
    """Open the page with `query` (autorun), wait for the reply, and return what the page exposes; fails with
    the page's console when it errs. Every request must go to `base`: anything else is blocked and fails."""
    page = context.new_page()
    console: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

    def only_local(route) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    try:
        page.goto(base + "?" + urlencode({**query, "autorun": "1"}))
        page.wait_for_function("['done', 'error'].includes(window.__state)", timeout=PAGE_TIMEOUT_MS)
        state = page.evaluate("""() => ({state: window.__state, error: window.__error, device: window.__device,
            dtype: window.__dtype, promptIds: window.__promptIds, tokens: window.__tokens,
            streamedTokens: window.__streamedTokens, reply: window.__reply, chunks: window.__chunks,
            status: document.getElementById('status').textContent})""")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()
    log = "\n".join(console[-40:])
    assert not elsewhere, f"the page asked for files outside {base}: {elsewhere}"
    assert state["state"] == "done", f"the page failed: {state['error']}\nconsole:\n{log}"
    return state


def assert_same_greedy_tokens(page: dict, ours: er.RunResult, prompt_ids: list[int], tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert page["device"] == "wasm"
    assert page["promptIds"] == prompt_ids, "transformers.js' chat template + tokenizer gave other prompt ids"
    assert page["tokens"] == ours.tokens[0], (
        f"browser greedy tokens differ from our ONNX backend's: {er.first_divergence(ours.tokens[0], page['tokens'])=}"
        f"\nours:    {ours.tokens[0]}\nbrowser: {page['tokens']}")
    assert page["streamedTokens"] == page["tokens"], "the streamer saw other tokens than generate returned"
    assert page["chunks"] >= 1
    text = AutoTokenizer.from_pretrained(str(tokenizer_dir)).decode(page["tokens"], skip_special_tokens=True)
    assert page["reply"] == text


def _export(hf_folder: Path, out: Path, quantize: str | None) -> Path:
    from export.onnx_export import export_onnx
    from qwen_mlx.checkpoint import prepare_model

    # The exporter's own accuracy check is its tests' business; here only the browser is in question.
    extra = {"validate": False}  # the exporter checks itself in its own tests
    export_onnx(prepare_model(str(hf_folder)), out, dtype="float32", quantize=quantize, opset=None, force=True,
                **extra)
    return out


def _screenshot_path(tmp_path: Path, name: str) -> Path:
    """tmp_path, or docs/browser-chat.png when QWEN_MLX_BROWSER_SCREENSHOT names this test's model."""
    if os.environ.get("QWEN_MLX_BROWSER_SCREENSHOT") == name:
        return REPO / "docs" / "browser-chat.png"
    return tmp_path / "browser-chat.png"


# ---- tiny random model (default suite) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder, its float32 ONNX export): one export for this module."""
    pytest.importorskip("transformers")
    hf = tiny_model("gqa2-untied")
    return hf, _export(hf, tmp_path_factory.mktemp("browser") / "tiny", None)


def test_page_reproduces_our_greedy_tokens_tiny(browser, tiny_export, tmp_path):
    hf, folder = tiny_export
    prompt = "hello world"
    texts, ids = er.reference_prompts(hf, [prompt], chat=True)
    ours = er.run_runtime("ours", folder, ids, N_TOKENS, texts=texts)
    assert ours.ok, f"our ONNX backend failed on {folder}:\n{ours.error}"
    shot = _screenshot_path(tmp_path, "tiny")
    with serving(folder) as base:
        page = chat_in_page(browser, base, dict(model=folder.name, dtype="fp32", device="wasm", prompt=prompt,
                                                max_new_tokens=N_TOKENS), screenshot=shot)
    assert page["dtype"] == "fp32"
    assert_same_greedy_tokens(page, ours, ids[0], hf)
    assert shot.stat().st_size > 1000


def test_page_loads_the_dtype_set_with_the_wasm_default(browser, tiny_model, tiny_onnx_set):
    """`export-onnx --dtypes all` (tests/conftest.py): with no dtype in the URL the page takes transformers.js'
    wasm default, q8 (model_quantized.onnx), and replies. Token for token it is compared on uint8: onnxruntime's
    AVX2 kernel for uint8 activations x int8 weights (q8 here) adds pairs in saturating 16 bits on CPUs without
    VNNI (this one), WebAssembly does not, so on q8 the two drift apart within a few tokens of a random model;
    uint8 weights take an exact path on both."""
    hf = tiny_model("gqa2-untied")
    prompt = "hello world"
    texts, ids = er.reference_prompts(hf, [prompt], chat=True)
    ours = er.run_runtime("ours", tiny_onnx_set, ids, N_TOKENS, texts=texts, onnx_file="model_uint8.onnx")
    assert ours.ok, f"our ONNX backend failed on {tiny_onnx_set}:\n{ours.error}"
    with serving(tiny_onnx_set) as base:
        default = chat_in_page(browser, base, dict(model=tiny_onnx_set.name, device="wasm", prompt=prompt,
                                                   max_new_tokens=N_TOKENS))
        uint8 = chat_in_page(browser, base, dict(model=tiny_onnx_set.name, dtype="uint8", device="wasm",
                                                 prompt=prompt, max_new_tokens=N_TOKENS))
    assert default["dtype"] == "q8" and default["promptIds"] == ids[0] and 1 <= len(default["tokens"]) <= N_TOKENS
    assert uint8["dtype"] == "uint8"
    assert_same_greedy_tokens(uint8, ours, ids[0], hf)


FAKE_WEBGPU = "Object.defineProperty(navigator, 'gpu', {value: {requestAdapter: async () => ({})}})"


@pytest.mark.parametrize("gpu", [False, True], ids=["no-adapter", "adapter"])
def test_auto_device_is_webgpu_only_with_an_adapter(browser, tiny_export, gpu):
    """device=auto: WebGPU where the browser gives an adapter, wasm otherwise (this headless Chromium
    exposes navigator.gpu but, with --disable-gpu, no adapter; the 'adapter' case stands one in)."""
    _, folder = tiny_export
    page = browser.new_page()
    try:
        if gpu:
            page.add_init_script(FAKE_WEBGPU)
        with serving(folder) as base:
            page.goto(base)
            page.wait_for_function("window.__autoDevice !== undefined", timeout=60_000)
            assert page.evaluate("window.__autoDevice") == ("webgpu" if gpu else "wasm")
            assert page.evaluate("document.getElementById('dtype').value") == "fp32"  # the only graph there
    finally:
        page.close()


# ---- the real checkpoint, int4 (-m real) ------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.slow  # ~1.5 minutes; the tiny model's pages stay in the default tier
def test_page_reproduces_our_greedy_tokens_real_q4(browser, real_model_dir, tmp_path_factory, tmp_path):
    folder = _export(real_model_dir, tmp_path_factory.mktemp("browser-real") / "qwen2.5-coder-0.5b-q4", "int4")
    try:
        assert (folder / "onnx" / "model_q4.onnx").is_file()
        prompt = "Write a Python function that checks whether a string is a palindrome."
        texts, ids = er.reference_prompts(real_model_dir, [prompt], chat=True)
        ours = er.run_runtime("ours", folder, ids, N_TOKENS, texts=texts, onnx_file="model_q4.onnx",
                              quantize="int4")
        assert ours.ok, f"our ONNX backend failed on {folder}:\n{ours.error}"
        shot = _screenshot_path(tmp_path, "real")
        with serving(folder) as base:
            page = chat_in_page(browser, base, dict(model=folder.name, dtype="q4", device="wasm", prompt=prompt,
                                                    max_new_tokens=N_TOKENS), screenshot=shot)
        assert page["dtype"] == "q4"
        assert_same_greedy_tokens(page, ours, ids[0], real_model_dir)
        print(f"\nbrowser (wasm, q4): {page['status']}\n{json.dumps(page['reply'])}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~0.7 GB; pytest keeps the last runs' temporary folders


# ---- serve.py ---------------------------------------------------------------------------------------------

def test_serve_refuses_bad_input_in_one_line(tmp_path):
    not_export = tmp_path / "plain"
    not_export.mkdir()
    cases = [([str(not_export)], "is not an ONNX export folder"),
             ([str(tmp_path / "missing")], "is not an ONNX export folder")]
    (tmp_path / "fake" / "onnx").mkdir(parents=True)
    (tmp_path / "fake" / "config.json").write_text("{}")
    cases.append(([str(tmp_path / "fake"), "--node-modules", str(tmp_path)], "no @huggingface/transformers in"))
    for args, message in cases:
        proc = subprocess.run([sys.executable, str(SERVE), *args, "--port", "0"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_serve_serves_only_its_mounts(tiny_export):
    import http.client

    _, folder = tiny_export
    reason = er.missing_reason("transformersjs")
    if reason:
        unavailable(reason)
    with serving(folder) as base:
        host, port = urlsplit(base).netloc.split(":")

        def get(path: str, method: str = "GET") -> http.client.HTTPResponse:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request(method, path)  # sent as written: no client-side ".." folding
            response = conn.getresponse()
            response.body = response.read()
            conn.close()
            return response

        ok = get(f"/models/{folder.name}/config.json")
        assert ok.status == 200 and json.loads(ok.body) == json.loads((folder / "config.json").read_text())
        assert ok.getheader("Cross-Origin-Embedder-Policy") == "require-corp"
        assert ok.getheader("Cache-Control") == "no-store"
        assert json.loads(get("/models.json").body) == {folder.name: ["model.onnx"]}
        assert get("/ort/ort-wasm-simd-threaded.asyncify.wasm", "HEAD").getheader("Content-Type") == "application/wasm"
        assert get("/").status == 200 and get("/chat.js").status == 200
        for path in (f"/models/{folder.name}/", f"/models/{folder.name}/../../../etc/passwd", "/../../etc/passwd",
                     "/serve.py", "/transformers/../package.json", f"/models/{folder.name}/%2e%2e/{folder.name}"):
            assert get(path).status == 404, path
