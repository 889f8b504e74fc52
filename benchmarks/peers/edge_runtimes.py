"""Greedy parity of an ONNX export across edge runtimes, each in its own environment.

    python -m benchmarks.peers.edge_runtimes --folder /tmp/real_onnx_fp32 --reference <hf folder> [-n 32]
        [--prompt TEXT ...] [--runtimes genai,transformersjs,optimum,ours] [--quantize int4]

Runtimes, each run as a subprocess that prints one JSON object (token ids, timings, peak RSS):
  hf              HF transformers float32 (`Qwen2ForCausalLM`, `generate(do_sample=False,
                  repetition_penalty=1.0)`), in this interpreter's environment: the reference.
  ours            our ONNX backend (`export.backends.onnx.OnnxBackend` + `qwen_mlx.backends.base.Session`).
  genai           onnxruntime-genai (`og.Model(folder)`, `og.Generator`, greedy), venv $PEERS/genai.
  optimum         optimum-onnx `ORTModelForCausalLM.from_pretrained(folder, subfolder="onnx",
                  file_name=...)` + `generate`, venv $PEERS/optimum.
  transformersjs  transformers.js in Node (`benchmarks/peers/transformersjs_greedy.mjs`), project $PEERS/node.

$PEERS is $QWEN_MLX_PEERS (default /work/venvs), made by `benchmarks/peers/setup_peers.sh`. Prompts are tokenized
once (by the reference's tokenizer, chat template applied) and every runtime gets the same ids; each runtime
also encodes the prompt text with its own tokenizer, and the table says whether its ids agree.

This module is also the worker: `python -m benchmarks.peers.edge_runtimes --worker KIND` (the repository root on
PYTHONPATH) reads a request (JSON) on stdin and prints the result as the last line of stdout. It and
benchmarks.common import nothing but the standard library at module level, so it runs in any peer venv; our
own modules are imported only by the `ours` worker, in our environment.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (module_command, module_env, node_project, peer_python, peers_root, prog,
                               real_checkpoint_folder)

NODE_SCRIPT = Path(__file__).resolve().with_name("transformersjs_greedy.mjs")
WORKER = "benchmarks.peers.edge_runtimes"  # this module, as `python -m` runs it
RUNTIMES = ("hf", "ours", "genai", "optimum", "transformersjs")
PEER_RUNTIMES = ("genai", "optimum", "transformersjs")
DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a KV cache is in one paragraph.",
)
# Which file of an export folder each (dtype, quantize) means; transformers.js names them by its `dtype`.
ONNX_FILES = {("float32", None): "model.onnx", ("float16", None): "model_fp16.onnx", ("float32", "int4"): "model_q4.onnx"}
# The whole set (export/onnx_format.py VARIANT_FILES), written out here: this file imports only the stdlib.
TJS_DTYPES = {"model.onnx": "fp32", "model_fp16.onnx": "fp16", "model_quantized.onnx": "q8",
              "model_int8.onnx": "int8", "model_uint8.onnx": "uint8", "model_q4.onnx": "q4", "model_q4f16.onnx": "q4f16"}


# --------------------------------------------------------------------------------------------------------
# Where the peers live (benchmarks.common: peers_root, peer_python, node_project)

def missing_reason(runtime: str) -> str | None:
    """None when `runtime` can run here, else why not (for pytest.skip and the table)."""
    if runtime in ("hf", "ours"):
        return None
    if runtime == "transformersjs":
        from shutil import which
        if which("node") is None:
            return "node is not installed"
        if not (node_project() / "node_modules" / "@huggingface" / "transformers").is_dir():
            return (f"no @huggingface/transformers under {node_project()} "
                    f"(run benchmarks/peers/setup_peers.sh {peers_root()})")
        return None
    if not peer_python(runtime).exists():
        return f"no venv {peers_root() / runtime} (run benchmarks/peers/setup_peers.sh {peers_root()})"
    return None


# --------------------------------------------------------------------------------------------------------
# Results

@dataclass
class RunResult:
    runtime: str
    ok: bool
    tokens: list[list[int]] = field(default_factory=list)
    error: str = ""
    prompt_ids: list[list[int]] | None = None  # the runtime's own tokenization of the prompt texts
    load_s: float = 0.0
    timings: list[dict] = field(default_factory=list)  # per prompt: prefill_s, decode_s, decode_tokens
    peak_rss_mb: float = 0.0
    info: dict = field(default_factory=dict)

    def prefill_tps(self, prompt_lens: list[int]) -> float:
        secs = sum(t["prefill_s"] for t in self.timings)
        return sum(prompt_lens[: len(self.timings)]) / secs if secs else 0.0

    def decode_tps(self) -> float:
        secs = sum(t["decode_s"] for t in self.timings)
        return sum(t["decode_tokens"] for t in self.timings) / secs if secs else 0.0


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _run_worker(command: list[str], request: dict, runtime: str, timeout: float, env: dict | None = None) -> RunResult:
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return RunResult(runtime, False, error=f"timed out after {timeout:.0f}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return RunResult(runtime, False, error=_tail(proc.stderr or proc.stdout) or f"exit code {proc.returncode}")
    data = json.loads(lines[-1])
    if "error" in data:
        return RunResult(runtime, False, error=data["error"])
    result = RunResult(runtime, True, tokens=data["tokens"], prompt_ids=data.get("prompt_ids"),
                       load_s=data.get("load_s", 0.0), timings=data.get("timings", []),
                       peak_rss_mb=data.get("peak_rss_mb", 0.0), info=data.get("info", {}))
    result.info.setdefault("wall_s", round(time.perf_counter() - start, 2))
    return result


class PersistentRow:
    """One runtime on one folder, loaded once in its own process, timed a generation at a time on request:
    rows of a benchmark take turns (row 1, row 2, ..., row 1, ...) while each keeps its warm session, so
    a busy spell of a shared machine falls on every row alike without reloading a model per round."""

    def __init__(self, runtime: str, folder: str | Path, prompt_ids: list[int], n: int, *, onnx_file: str = "model.onnx",
                 quantize: str | None = None, min_new_tokens: int = 0, warmup: int = 0, threads: int | None = None):
        if runtime not in ("genai", "ours"):
            raise ValueError(f"persistent rows run genai or ours, not {runtime}")
        request = dict(folder=str(Path(folder).resolve()), prompt_ids=[prompt_ids], n=n, onnx_file=onnx_file,
                       quantize=quantize, min_new_tokens=min_new_tokens, warmup=warmup, threads=threads,
                       persistent=True)
        python = sys.executable if runtime == "ours" else str(peer_python(runtime))
        self.runtime = runtime
        self.proc = subprocess.Popen(module_command(WORKER, "--worker", runtime, python=python), env=module_env(),
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready = self._reply()
        self.result = RunResult(runtime, True, load_s=ready.get("load_s", 0.0), info=ready.get("info", {}))

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                data = json.loads(line)
                if "error" in data:
                    raise RuntimeError(data["error"])
                return data
        raise RuntimeError(f"{self.runtime} worker exited ({self.proc.wait()})")

    def round(self) -> dict:
        """One timed generation; its timing is appended to self.result and returned."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        data = self._reply()
        self.result.tokens += data["tokens"]
        self.result.timings += data["timings"]
        self.result.peak_rss_mb = max(self.result.peak_rss_mb, data["peak_rss_mb"])
        return data["timings"][0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run_runtime(runtime: str, folder: str | Path, prompt_ids: list[list[int]], n: int, *,
                texts: list[str] | None = None, onnx_file: str = "model.onnx", dtype: str = "float32",
                quantize: str | None = None, min_new_tokens: int = 0, warmup: int = 0,
                timeout: float = 1800) -> RunResult:
    """Greedy-decode `n` tokens after each prompt with `runtime` on `folder` (an export folder, or an HF
    folder for `hf`). `min_new_tokens` suppresses EOS for that many tokens (the same rule in every runtime,
    for benchmarks); `warmup` runs that many tokens on the first prompt once, untimed, first."""
    reason = missing_reason(runtime)
    if reason:
        return RunResult(runtime, False, error=f"skipped: {reason}")
    request = dict(folder=str(Path(folder).resolve()), prompt_ids=prompt_ids, texts=texts, n=n, onnx_file=onnx_file,
                   dtype=dtype, quantize=quantize, min_new_tokens=min_new_tokens, warmup=warmup)
    if runtime == "transformersjs":
        request["tjs_dtype"] = TJS_DTYPES.get(onnx_file, "fp32")
        return _run_worker(["node", str(NODE_SCRIPT)], request, runtime, timeout,
                           env={"TJS_NODE_PROJECT": str(node_project())})
    python = sys.executable if runtime in ("hf", "ours") else str(peer_python(runtime))
    return _run_worker(module_command(WORKER, "--worker", runtime, python=python), request, runtime, timeout,
                       module_env())


def reference_prompts(hf_folder: str | Path, prompts: list[str], chat: bool = True) -> tuple[list[str], list[list[int]]]:
    """The prompt texts (chat template applied when `chat`) and their ids, by the HF tokenizer in this env."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf_folder))
    texts = []
    for p in prompts:
        if chat and tok.chat_template:
            texts.append(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True))
        else:
            texts.append(p)
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def first_divergence(ref: list[int], got: list[int]) -> int | None:
    """Index of the first differing token, None when identical (a length mismatch diverges at the shorter end)."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def compare(reference: RunResult, other: RunResult) -> str:
    """'yes', 'no (prompt P diverges at token I: ref X vs Y)', or the error's first line."""
    if not other.ok:
        return "error: " + other.error.strip().splitlines()[-1][:200] if other.error.strip() else "error"
    for p, (ref, got) in enumerate(zip(reference.tokens, other.tokens)):
        i = first_divergence(ref, got)
        if i is not None:
            a = ref[i] if i < len(ref) else "<end>"
            b = got[i] if i < len(got) else "<end>"
            return f"no (prompt {p}: first divergence at token {i}: ref {a} vs {b})"
    return "yes"


def tokenizer_agreement(prompt_ids: list[list[int]], result: RunResult) -> str:
    if not result.ok or result.prompt_ids is None:
        return "-"
    return "yes" if result.prompt_ids == prompt_ids else "no"


# --------------------------------------------------------------------------------------------------------
# Workers (run inside each runtime's own environment)

def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a
    worker forked from a big parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # macOS: bytes there, but no exec issue


class _Clock:
    """Timestamps per emitted token: prefill = start -> first token, decode = first -> last token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter())

    def timing(self) -> dict:
        if not self.marks:
            return dict(prefill_s=0.0, decode_s=0.0, decode_tokens=0)
        return dict(prefill_s=self.marks[0] - self.start, decode_s=self.marks[-1] - self.marks[0],
                    decode_tokens=len(self.marks) - 1)


def _hf_generate(model: Any, ids: list[int], n: int, min_new: int) -> tuple[list[int], dict]:
    """transformers' greedy `generate` (the reference and optimum), timed through a streamer."""
    import torch

    clock = _Clock()

    class Streamer:
        first = True

        def put(self, value: Any) -> None:
            if self.first:  # generate() hands the prompt over first
                self.first = False
                return
            clock.mark()

        def end(self) -> None:
            pass

    input_ids = torch.tensor([ids], dtype=torch.long)
    clock.start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         repetition_penalty=1.0, max_new_tokens=n, min_new_tokens=min_new or None,
                         temperature=None, top_p=None, top_k=None, streamer=Streamer())
    return out[0, len(ids):].tolist(), clock.timing()


def _worker_hf(req: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(req["folder"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    prompt_ids = None
    if req.get("texts"):
        tok = AutoTokenizer.from_pretrained(req["folder"])
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in req["texts"]]
    return _loop(req, load_s, prompt_ids, lambda ids, n, m: _hf_generate(model, ids, n, m),
                 info=dict(torch=torch.__version__))


def _worker_optimum(req: dict) -> dict:
    import onnxruntime
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    folder = Path(req["folder"])
    sub = "onnx" if (folder / "onnx" / req["onnx_file"]).exists() else ""
    kwargs = dict(subfolder=sub) if sub else {}
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(str(folder), file_name=req["onnx_file"], provider="CPUExecutionProvider",
                                                local_files_only=True, **kwargs)
    load_s = time.perf_counter() - t0
    prompt_ids = None
    if req.get("texts"):
        tok = AutoTokenizer.from_pretrained(str(folder))
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in req["texts"]]
    import importlib.metadata as md
    return _loop(req, load_s, prompt_ids, lambda ids, n, m: _hf_generate(model, ids, n, m),
                 info=dict(optimum_onnx=md.version("optimum-onnx"), transformers=transformers.__version__,
                           onnxruntime=onnxruntime.__version__))


def _worker_genai(req: dict) -> dict:
    import onnxruntime_genai as og

    folder = req["folder"]
    t0 = time.perf_counter()
    config = og.Config(folder)
    configured = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    wanted = f"onnx/{req['onnx_file']}" if req.get("onnx_file") else configured
    if wanted != configured and (Path(folder) / wanted).is_file():  # another file of the set (q4f16 beside q4)
        config.overlay(json.dumps({"model": {"decoder": {"filename": wanted}}}))
    if req.get("threads"):  # genai's default is 1 intra-op thread
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": req["threads"]}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    prompt_ids = None
    if req.get("texts"):
        tok = og.Tokenizer(model)
        prompt_ids = [[int(x) for x in tok.encode(t)] for t in req["texts"]]

    def generate(ids: list[int], n: int, min_new: int) -> tuple[list[int], dict]:
        params = og.GeneratorParams(model)
        options: dict[str, Any] = dict(do_sample=False, max_length=len(ids) + n, repetition_penalty=1.0,
                                       temperature=1.0, top_k=1, top_p=1.0)
        if min_new:
            options["min_length"] = len(ids) + min_new
        params.set_search_options(**options)
        gen = og.Generator(model, params)
        clock = _Clock()
        gen.append_tokens([ids])  # runs the prompt
        out: list[int] = []
        while not gen.is_done() and len(out) < n:
            gen.generate_next_token()  # picks from the last logits, then runs the new token
            out.append(int(gen.get_next_tokens()[0]))
            clock.mark()
        del gen
        return out, clock.timing()

    return _loop(req, load_s, prompt_ids, generate, info=dict(onnxruntime_genai=og.__version__))


def _eos_ids(folder: Path) -> set[int]:
    """generation_config.json's eos ids, else config.json's: what transformers, genai (its genai_config is
    written from generation_config) and transformers.js stop on; the union would stop where they go on."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return set(value if isinstance(value, list) else [value])
    return set()


def _worker_ours(req: dict) -> dict:
    import numpy as np
    from export.backends.onnx import OnnxBackend
    from qwen_mlx.backends.base import Session

    folder = Path(req["folder"])
    t0 = time.perf_counter()
    variant = TJS_DTYPES.get(req.get("onnx_file") or "")  # the file compared, named as transformers.js does
    backend = (OnnxBackend(folder, variant=variant, threads=req.get("threads")) if variant else
               OnnxBackend(folder, req.get("dtype"), req.get("quantize"), threads=req.get("threads")))
    load_s = time.perf_counter() - t0
    eos = _eos_ids(folder)

    def generate(ids: list[int], n: int, min_new: int) -> tuple[list[int], dict]:
        session = Session(backend)
        clock = _Clock()
        logits = session.prefill(ids)
        out: list[int] = []
        while True:
            logits = np.asarray(logits, dtype=np.float32).reshape(-1).copy()
            if len(out) < min_new:
                logits[list(eos)] = -np.inf
            token = int(np.argmax(logits))
            out.append(token)
            clock.mark()
            if len(out) >= n or token in eos:
                break
            logits = session.step(token)
        return out, clock.timing()

    prompt_ids = None
    if req.get("texts"):
        from qwen_mlx.tokenizer import Tokenizer
        tok = Tokenizer.from_folder(folder)
        prompt_ids = [tok.encode(t) for t in req["texts"]]
    return _loop(req, load_s, prompt_ids, generate, info=dict(device=getattr(backend, "device", "")))


def _loop(req: dict, load_s: float, prompt_ids: list[list[int]] | None, generate: Any, info: dict) -> dict:
    if req.get("warmup"):
        generate(req["prompt_ids"][0], req["warmup"], req["warmup"])
    if req.get("persistent"):  # PersistentRow: one line per round on stdin, one result line each on stdout
        print(json.dumps(dict(ready=True, load_s=load_s, prompt_ids=prompt_ids, info=info)), flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            out, timing = generate(req["prompt_ids"][0], req["n"], req.get("min_new_tokens") or 0)
            print(json.dumps(dict(tokens=[out], timings=[timing], peak_rss_mb=_peak_rss_mb())), flush=True)
        return dict(tokens=[], timings=[], load_s=load_s, peak_rss_mb=_peak_rss_mb(), info=info)
    tokens, timings = [], []
    for ids in req["prompt_ids"]:
        out, timing = generate(ids, req["n"], req.get("min_new_tokens") or 0)
        tokens.append(out)
        timings.append(timing)
    return dict(tokens=tokens, timings=timings, prompt_ids=prompt_ids, load_s=load_s,
                peak_rss_mb=_peak_rss_mb(), info=info)


WORKERS = dict(hf=_worker_hf, ours=_worker_ours, genai=_worker_genai, optimum=_worker_optimum)


def _worker_main(kind: str) -> int:
    req = json.loads(sys.stdin.readline())  # one line: a persistent worker reads its rounds after it
    try:
        result = WORKERS[kind](req)
    except BaseException as error:  # reported as data, so the table can show it
        import traceback
        traceback.print_exc()
        result = dict(error=f"{type(error).__name__}: {error}")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------
# The parity table

def parity_table(results: list[RunResult], reference: RunResult, prompt_ids: list[list[int]],
                 ours: RunResult | None = None) -> str:
    """Markdown: per runtime, whether it loads and whether its greedy tokens equal the HF reference's (and
    our ONNX backend's, when `ours` ran: runtimes that agree with ours but not with HF point at the export)."""
    head = "| runtime | loads | tokens identical to HF reference |"
    head += " identical to our ONNX backend |" if ours is not None and ours.ok else ""
    head += " own tokenizer agrees | peak RSS MB |"
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        same = "(reference)" if r is reference else compare(reference, r)
        row = f"| {r.runtime}{r.info.get('label', '')} | {'yes' if r.ok else 'no'} | {same} |"
        if ours is not None and ours.ok:
            row += " (ours) |" if r is ours else (" - |" if r is reference else f" {compare(ours, r)} |")
        row += f" {tokenizer_agreement(prompt_ids, r)} | {r.peak_rss_mb:.0f} |"
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help="export folder (onnx/model.onnx, genai_config.json, ...)")
    ap.add_argument("--reference", help="HF folder of the same checkpoint (default: the real checkpoint)")
    ap.add_argument("-n", type=int, default=32, help="tokens to decode per prompt")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable); chat template applied")
    ap.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    ap.add_argument("--runtimes", default="ours,genai,transformersjs,optimum")
    ap.add_argument("--onnx-file", default=None, help="model.onnx (default), model_q4.onnx, model_fp16.onnx")
    ap.add_argument("--quantize", default=None, help="int4: compare the q4 file (for ours: OnnxBackend quantize)")
    args = ap.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    if not args.folder:
        ap.error("--folder is required")
    reference_folder = args.reference or real_checkpoint_folder()
    onnx_file = args.onnx_file or ("model_q4.onnx" if args.quantize == "int4" else "model.onnx")
    dtype = "float16" if onnx_file == "model_fp16.onnx" else "float32"
    texts, prompt_ids = reference_prompts(reference_folder, list(args.prompt or DEFAULT_PROMPTS), chat=not args.no_chat)
    print(f"prompts: {[len(p) for p in prompt_ids]} tokens; decoding {args.n} greedy tokens; export {args.folder} "
          f"({onnx_file}); reference {reference_folder}", flush=True)
    reference = run_runtime("hf", reference_folder, prompt_ids, args.n, texts=texts)
    if not reference.ok:
        print("reference failed:\n" + reference.error)
        return 1
    results = [reference]
    for rt in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        print(f"running {rt} ...", flush=True)
        results.append(run_runtime(rt, args.folder, prompt_ids, args.n, texts=texts, onnx_file=onnx_file,
                                   dtype=dtype, quantize=args.quantize))
    print()
    ours = next((r for r in results if r.runtime == "ours"), None)
    print(parity_table(results, reference, prompt_ids, ours))
    for r in results:
        if not r.ok:
            print(f"\n### {r.runtime} error\n```\n{r.error}\n```")
    print("\nreference tokens:", json.dumps(reference.tokens))
    return 0



if __name__ == "__main__":
    sys.exit(main())
