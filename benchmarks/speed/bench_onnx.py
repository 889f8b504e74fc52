"""CPU prefill / decode speed and peak memory of ONNX runtimes on the real checkpoint, in one run.

    python -m benchmarks.speed.bench_onnx [--hf HF_FOLDER] [--ours-fp32 DIR] [--ours-q4 DIR [--ours-q4 DIR2]] [-n 64]
        [--rounds 1] [--prepare-only] [--only LABEL,...] [--transformersjs]

Rows (each its own subprocess, so peak RSS is that runtime's alone; see benchmarks/peers/edge_runtimes.py):
  - optimum-onnx's own export (`optimum-cli export onnx --task text-generation-with-past`, fp32) run by
    ORTModelForCausalLM.generate
  - onnxruntime-genai's model builder (`-p int4 -e cpu` and `-p fp32 -e cpu`) run by onnxruntime-genai
  - our exports (fp32 onnx/model.onnx, int4 onnx/model_q4.onnx) run by onnxruntime-genai and by our own
    backend (export.backends.onnx.OnnxBackend through qwen_mlx.backends.base.Session)
  - HF transformers float32 (torch) as the reference for the token check; transformers.js on our exports
    with --transformersjs
Every row gets the same prompt ids (chat template applied, ~150 tokens) and decodes exactly -n tokens greedily
(EOS suppressed until then: min_new_tokens, the same rule in each runtime), after an untimed 8-token warm-up.
prefill tok/s = prompt tokens / (start -> first token); decode tok/s = (n - 1) / (first -> last token).
--ours-q4 given twice (say, an export made before a change and one after) adds rows for each, named by folder.
--rounds R runs the whole list of rows R times in turn (row 1, row 2, ..., row 1, row 2, ...), so that a busy
spell of a shared machine falls on every row alike; each row shows its best over all rounds.
--interleaved keeps one process per row loaded for the whole run (onnxruntime-genai and our backend rows
only) and times one generation per row per round, rows taking turns (the order reversed every other round);
the table shows median / best over the rounds and each row's ratio to the genai builder int4 row at the same
thread count. --threads 1,2 runs every such row once per intra-op thread count (genai's default is 1).
--ours-q4-gqa DIR adds our `export-onnx --attention gqa` int4 folder beside the standard one.
"model MB" is the size of the model file and its external data, as a runtime loads them.
Peer exports are cached under --peer-models (default /work/peer_models); our exports are made with
`python cli.py export-onnx` into the same place when --ours-* is not given and /tmp/real_onnx_* is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, peer_python, peers_root, prog, real_checkpoint_folder, round_order
from benchmarks.peers import edge_runtimes as er

PROMPT = (
    "Review the following Python function. Explain what it does, point out any bugs or edge cases it "
    "mishandles, and then rewrite it with type hints, a docstring and clearer variable names.\n\n"
    "```python\n"
    "def f(a, b=None):\n"
    "    r = {}\n"
    "    for i, x in enumerate(a):\n"
    "        k = x if b is None else b(x)\n"
    "        if k in r:\n"
    "            r[k].append(i)\n"
    "        else:\n"
    "            r[k] = [i]\n"
    "    return [v for k, v in sorted(r.items()) if len(v) > 1]\n"
    "```\n"
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(command: list[str], log_path: Path) -> None:
    log(f"$ {' '.join(command)}  (log: {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[0]} ... failed ({proc.returncode}) after {time.perf_counter() - start:.0f}s:\n{tail}")
    log(f"  done in {time.perf_counter() - start:.0f}s")


def prepare_genai_builder(hf: Path, root: Path, precision: str) -> Path:
    """onnxruntime-genai's model builder output for `precision` (int4|fp32), cached."""
    out = root / f"genai_builder_{precision}"
    if (out / "genai_config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    _run([str(peer_python("genai")), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
          "-p", precision, "-e", "cpu", "-c", str(root / ".builder_cache")], root / f"genai_builder_{precision}.log")
    return out


def prepare_optimum(hf: Path, root: Path) -> Path:
    """optimum-onnx's own export of the checkpoint (fp32, with past), cached."""
    out = root / "optimum_fp32"
    if (out / "model.onnx").is_file() and (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    cli = peers_root() / "optimum" / "bin" / "optimum-cli"
    _run([str(cli), "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past",
          "--framework", "pt", str(out)], root / "optimum_fp32.log")
    return out


def prepare_ours(hf: Path, root: Path, quantize: str | None, given: str | None) -> Path:
    """Our export: --ours-* if given, else /tmp/real_onnx_{fp32,q4} when present, else `cli.py export-onnx`."""
    tag = "q4" if quantize else "fp32"
    if given:
        return Path(given)
    default = Path(f"/tmp/real_onnx_{tag}")
    name = "model_q4.onnx" if quantize else "model.onnx"
    if (default / "onnx" / name).is_file():
        return default
    out = root / f"ours_{tag}"
    if (out / "onnx" / name).is_file():
        return out
    command = [sys.executable, "cli.py", "export-onnx", "--model", str(hf), "--out", str(out), "--force",
               "--dtypes", "q4" if quantize else "fp32"]
    _run(command, root / f"ours_{tag}.log")
    return out


def model_bytes(folder: Path, onnx_file: str) -> int:
    """The model file and its external data (`model.onnx_data`, `model.onnx.data`), wherever in the folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob(f"{onnx_file}*") if p.is_file())


def merge(old: er.RunResult | None, new: er.RunResult) -> er.RunResult:
    """One row over several rounds: every round's timings (the table shows the best), the highest peak RSS,
    the fastest load; a failed round is the row's result."""
    if old is None or not old.ok:
        return new if old is None else old
    if not new.ok:
        return new
    old.timings += new.timings
    old.peak_rss_mb = max(old.peak_rss_mb, new.peak_rss_mb)
    old.load_s = min(old.load_s, new.load_s)
    old.info.setdefault("rounds", [old.info.get("loadavg_1m_after")]).append(new.info.get("loadavg_1m_after"))
    if old.tokens != new.tokens:
        old.info["tokens_differ_between_rounds"] = True
    return old


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def versions() -> str:
    out = {}
    for name, py, mod in (("onnxruntime-genai", peer_python("genai"), "onnxruntime_genai"),
                          ("optimum-onnx", peer_python("optimum"), None),
                          ("onnxruntime (ours)", Path(sys.executable), "onnxruntime")):
        if not Path(py).exists():
            continue
        code = (f"import {mod}; print({mod}.__version__)" if mod else
                "import importlib.metadata as m; print(m.version('optimum-onnx'), 'transformers', m.version('transformers'))")
        proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
        out[name] = proc.stdout.strip() or "?"
    return ", ".join(f"{k} {v}" for k, v in out.items())


def interleaved(args, hf: Path, rows: list, errors: dict) -> int:
    """--interleaved: PersistentRow per (row, thread count), `args.rounds` rounds in turn; prints the table."""
    import statistics

    texts, prompt_ids = er.reference_prompts(hf, [PROMPT], chat=True)
    ids, n_prompt = prompt_ids[0], len(prompt_ids[0])
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    live: dict[str, er.PersistentRow] = {}
    failed: dict[str, str] = {}
    for label, runtime, folder, onnx_file, quantize in rows:
        for threads in thread_counts:
            name = label + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "")
            if folder is None:
                failed[name] = errors[label]
                continue
            log(f"loading {name} ({folder}) ...")
            try:
                live[name] = er.PersistentRow(runtime, folder, ids, args.n, onnx_file=onnx_file, quantize=quantize,
                                              min_new_tokens=args.n, warmup=args.warmup, threads=threads)
            except RuntimeError as error:
                failed[name] = str(error).strip().splitlines()[-1][:160]
    loads = []
    try:
        for round_ in range(args.rounds):
            order = round_order(list(live.items()), round_)
            for name, row in order:
                t = row.round()
                log(f"round {round_ + 1}/{args.rounds} {name}: prefill {n_prompt / t['prefill_s']:.1f}, "
                    f"decode {t['decode_tokens'] / t['decode_s']:.1f} tok/s")
            loads.append(round(os.getloadavg()[0], 2))
    finally:
        for row in live.values():
            row.close()

    def rates(row: er.PersistentRow) -> tuple[list[float], list[float]]:
        return ([n_prompt / t["prefill_s"] for t in row.result.timings],
                [t["decode_tokens"] / t["decode_s"] for t in row.result.timings])

    print(f"\n**Machine:** {machine()}  ")
    print(f"**Versions:** {versions()}  ")
    print(f"**Workload:** prompt {n_prompt} tokens (chat template), greedy decode of {args.n} tokens (EOS "
          f"suppressed), untimed {args.warmup}-token warm-up; one process per row loaded once, {args.rounds} rounds "
          f"of one generation per row in turn (order reversed every other round); median / best; load average "
          f"after each round: {', '.join(map(str, loads))}.\n")
    print("| model / runtime | prefill tok/s | decode tok/s | prefill / builder | decode / builder | tokens = first row |")
    print("| --- | --- | --- | --- | --- | --- |")
    first = next(iter(live.values()), None)
    for name, row in live.items():
        prefill, decode = rates(row)
        threads = name.rsplit(", ", 1)[-1] if ", " in name and "thread" in name else ""
        base = next((r for k, r in live.items() if k.startswith("genai builder int4") and k.endswith(threads)), None)
        ratio = ["-", "-"]
        if base is not None:
            bp, bd = rates(base)
            ratio = [f"{statistics.median(prefill) / statistics.median(bp):.3f}",
                     f"{statistics.median(decode) / statistics.median(bd):.3f}"]
        same = "yes" if row.result.tokens[0] == first.result.tokens[0] else "no"
        print(f"| {name} | {statistics.median(prefill):.1f} / {max(prefill):.1f} | "
              f"{statistics.median(decode):.1f} / {max(decode):.1f} | {ratio[0]} | {ratio[1]} | {same} |")
    for name, error in failed.items():
        print(f"| {name} | - | - | - | - | failed: {error} |")
    if args.json:
        Path(args.json).write_text(json.dumps({name: dict(timings=row.result.timings, tokens=row.result.tokens,
                                                          load_s=row.result.load_s, info=row.result.info)
                                               for name, row in live.items()}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", help="HF folder of the real checkpoint (default: python -m qwen_mlx.formats.real_checkpoint)")
    ap.add_argument("--ours-fp32", help="our fp32 export folder")
    ap.add_argument("--ours-q4", action="append",
                    help="our int4 export folder; give it twice to compare two (rows named by folder)")
    ap.add_argument("--peer-models", default="/work/peer_models")
    ap.add_argument("-n", type=int, default=64, help="decode tokens")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed generations per row (same process); best is shown")
    ap.add_argument("--rounds", type=int, default=1, help="passes over all rows, in turn; best is shown")
    ap.add_argument("--prepare-only", action="store_true", help="build the peer exports, run nothing")
    ap.add_argument("--only", help="comma-separated row labels (substrings) to run")
    ap.add_argument("--transformersjs", action="store_true", help="also run transformers.js on our exports")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--ours-q4-gqa", help="our int4 export made with --attention gqa (rows 'int4 gqa')")
    ap.add_argument("--interleaved", action="store_true",
                    help="persistent process per row, one timed generation per row per round, rows in turn")
    ap.add_argument("--threads", help="comma-separated intra-op thread counts for genai/ours rows (e.g. 1,2)")
    args = ap.parse_args(argv)

    hf = Path(args.hf or real_checkpoint_folder())
    root = Path(args.peer_models)
    rows: list[tuple[str, str, Path | None, str, str | None]] = []  # label, runtime, folder, onnx file, quantize

    def add(label: str, runtime: str, make, onnx_file: str = "model.onnx", quantize: str | None = None) -> None:
        if args.only and not any(s.strip() and s.strip() in label for s in args.only.split(",")):
            return
        try:
            folder = make()
        except Exception as error:  # noqa: BLE001 - one peer failing to build must not stop the others
            log(f"{label}: could not prepare: {error}")
            folder = None
            errors[label] = f"prepare failed: {str(error).strip().splitlines()[-1] if str(error).strip() else error}"
        rows.append((label, runtime, folder, onnx_file, quantize))

    errors: dict[str, str] = {}
    add("HF transformers (torch) fp32 [reference]", "hf", lambda: hf)
    add("optimum-onnx export + ORTModelForCausalLM, fp32", "optimum", lambda: prepare_optimum(hf, root))
    add("genai builder int4 + onnxruntime-genai", "genai", lambda: prepare_genai_builder(hf, root, "int4"))
    add("genai builder fp32 + onnxruntime-genai", "genai", lambda: prepare_genai_builder(hf, root, "fp32"))
    ours_fp32 = lambda: prepare_ours(hf, root, None, args.ours_fp32)  # noqa: E731
    q4_dirs = args.ours_q4 or [None]
    ours_q4 = {(f"int4 ({Path(d).name})" if len(q4_dirs) > 1 else "int4"): (lambda d=d: prepare_ours(hf, root, "int4", d))
               for d in q4_dirs}
    runtimes = [("onnxruntime-genai", "genai"), ("our OnnxBackend", "ours")]
    if args.transformersjs:
        runtimes.append(("transformers.js (node)", "transformersjs"))
    if args.ours_q4_gqa:
        ours_q4["int4 gqa"] = lambda: Path(args.ours_q4_gqa)
    for name, runtime in runtimes:
        add(f"our export fp32 + {name}", runtime, ours_fp32)
        for tag, make in ours_q4.items():
            add(f"our export {tag} + {name}", runtime, make, "model_q4.onnx", "int4")
    if args.interleaved:
        return interleaved(args, hf, [r for r in rows if r[1] in ("genai", "ours")], errors)
    if args.prepare_only:
        for label, _, folder, _, _ in rows:
            print(f"{label}: {folder or errors.get(label)}")
        return 0

    texts, prompt_ids = er.reference_prompts(hf, [PROMPT], chat=True)
    n_prompt = len(prompt_ids[0])
    log(f"prompt: {n_prompt} tokens, decode {args.n} tokens")
    results: dict[str, tuple[str, Path | None, er.RunResult]] = {}
    reference = None
    for round_ in range(args.rounds):
        for label, runtime, folder, onnx_file, quantize in rows:
            if folder is None:
                results[label] = (runtime, folder, er.RunResult(runtime, False, error=errors[label]))
                continue
            log(f"round {round_ + 1}/{args.rounds}: running {label} on {folder} ...")
            result = er.run_runtime(runtime, folder, prompt_ids * args.repeat, args.n, texts=texts,
                                    onnx_file=onnx_file, quantize=quantize, min_new_tokens=args.n,
                                    warmup=args.warmup, timeout=1800)
            result.info["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
            result.info["model_bytes"] = model_bytes(folder, onnx_file)
            if not result.ok:
                log(f"  failed: {result.error[-2000:]}")
            results[label] = (runtime, folder, merge(results.get(label, (None, None, None))[2], result))
            if runtime == "hf" and results[label][2].ok:
                reference = results[label][2]

    print(f"\n**Machine:** {machine()}  ")
    print(f"**Versions:** {versions()}  ")
    print(f"**Workload:** prompt {n_prompt} tokens (chat template), greedy decode of {args.n} tokens "
          f"(EOS suppressed), untimed {args.warmup}-token warm-up, best of {args.repeat} generations in one process "
          f"per row{f' and of {args.rounds} rounds over all rows in turn' if args.rounds > 1 else ''}, CPU execution provider. The machine is shared: compare rows of one run, not across runs "
          f"(raw timings and load averages: --json).\n")
    print("| model / runtime | model MB | prefill tok/s | decode tok/s | peak RSS (GB) | model load s | "
          "greedy tokens = HF fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, (runtime, folder, r) in results.items():
        size = r.info.get("model_bytes", 0)
        size = f"{size / 1e6:.0f}" if size else "-"
        if not r.ok:
            msg = r.error.strip().splitlines()[-1][:160] if r.error.strip() else "error"
            print(f"| {label} | {size} | - | - | - | - | failed: {msg} |")
            continue
        same = "(reference)" if r is reference else (er.compare(reference, r) if reference else "?")
        got = min(t["decode_tokens"] for t in r.timings) + 1
        note = "" if got == args.n else f" (only {got} tokens)"
        prefill = max(n_prompt / t["prefill_s"] for t in r.timings if t["prefill_s"] > 0)
        decode = max(t["decode_tokens"] / t["decode_s"] for t in r.timings if t["decode_s"] > 0)
        print(f"| {label} | {size} | {prefill:.1f} | {decode:.1f}{note} | {r.peak_rss_mb / 1024:.2f} | "
              f"{r.load_s:.1f} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(label=label, runtime=runtime, folder=str(folder), ok=r.ok,
                                                    error=r.error, tokens=r.tokens, timings=r.timings,
                                                    load_s=r.load_s, peak_rss_mb=r.peak_rss_mb, info=r.info)
                                               for label, (runtime, folder, r) in results.items()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
