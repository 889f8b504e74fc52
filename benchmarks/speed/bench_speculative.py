"""Speculative decoding on the real checkpoint (Qwen2.5-Coder-0.5B-Instruct, float32, MLX on this CPU): plain
decoding beside prompt lookup and a draft model at several draft lengths, and mlx-lm's own `draft_model` beside
its plain decoding on the same pair of folders, in one process with interleaved rounds.

    python -m benchmarks.speed.bench_speculative [--rounds 2] [--max-tokens 160] [--mlx-lm]

The task is an edit, where a reply quotes its input: a slice of the standard library's colorsys.py, returned with
type hints added (greedy). The draft model is an early exit of the checkpoint itself: its first 6 of 24 layers
with the final norm and output layer (written once beside the checkpoint's cache), as mlx-lm's users make one
when no smaller sibling exists. Each runner decodes the same prompt from a cold cache; decode tok/s counts the
tokens after the first over the time after the first (prefill excluded), and every runner's tokens are checked
against plain decoding's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

from benchmarks.common import load_openblas, prog, real_checkpoint, round_order

load_openblas()  # before mlx

EARLY_EXIT_LAYERS = 6


def task_source() -> str:
    import colorsys

    source = inspect.getsource(colorsys)
    return source[source.index("def rgb_to_yiq"):source.index("# HLS:")].strip() + "\n"


def early_exit(folder: Path, layers: int = EARLY_EXIT_LAYERS) -> Path:
    """The checkpoint cut after `layers` decoder layers (its norm and lm_head kept): a draft model."""
    out = folder.parent / f"{folder.name}-first{layers}"
    if (out / "config.json").is_file():
        return out
    import shutil

    from safetensors.numpy import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weights: dict = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    kept = {k: v for k, v in weights.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(kept, tmp / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


class Ours:
    def __init__(self, folder: Path, draft: Path):
        from qwen_mlx.backends import load
        from qwen_mlx.engine import local_engine
        from qwen_mlx.engine.speculative import load_draft_model

        self.loaded = load("mlx", str(folder), "float32")
        self.engine = local_engine(self.loaded.backend, self.loaded.tokenizer)
        self.engine.drafters["draft-model"] = load_draft_model(str(draft), self.loaded.tokenizer, "float32")

    def prompt(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode_chat([{"role": "user", "content": text}])

    def run(self, prompt: list[int], max_tokens: int, method: str | None, k: int | None) -> dict:
        from qwen_mlx.engine import Done, Request, Token
        from qwen_mlx.engine.speculative import Speculation
        from qwen_mlx.sampling import SamplingParams

        self.engine.backend.reset()  # a cold cache: no prefix kept from the last run
        self.engine.backend.prefixes.entries.clear()
        spec = Speculation(method, k) if method else None
        tokens, done = [], None
        for event in self.engine.stream(Request(prompt, SamplingParams(temperature=0), max_tokens, speculation=spec)):
            if isinstance(event, Token):
                tokens.append(event.id)
            elif isinstance(event, Done):
                done = event
        return {"tokens": tokens, "tps": (len(tokens) - 1) / done.decode_seconds,
                "drafted": done.draft_tokens or 0, "kept": done.accepted_tokens or 0}


class MlxLm:
    def __init__(self, folder: Path, draft: Path):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(folder))
        self.draft, _ = load(str(draft))

    def run(self, prompt: list[int], max_tokens: int, draft: bool, k: int = 3) -> dict:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        kw = {"draft_model": self.draft, "num_draft_tokens": k} if draft else {}
        tokens, t_first, t_end = [], 0.0, 0.0
        for r in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                 sampler=make_sampler(temp=0.0), **kw):
            tokens.append(r.token)
            if len(tokens) == 1:
                t_first = time.perf_counter()
            t_end = time.perf_counter()
            if r.finish_reason:
                break
        return {"tokens": tokens, "tps": (len(tokens) - 1) / max(t_end - t_first, 1e-9), "drafted": 0, "kept": 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--mlx-lm", action="store_true", help="also mlx-lm, plain and with the draft model")
    parser.add_argument("--mlx-lm-tokens", type=int, default=48, help="mlx-lm's runs (it decodes slower here)")
    parser.add_argument("--only", default=None, help="runner names to keep beside plain, separated by ;")
    args = parser.parse_args(argv)

    folder = real_checkpoint("float32", progress=False)
    draft = early_exit(folder)
    ours = Ours(folder, draft)
    text = "Add type hints to every function of this module. Reply with the whole module, nothing else.\n\n" \
        f"```python\n{task_source()}```"
    prompt = ours.prompt(text)
    runners = {"plain": (None, None), "prompt lookup, k 4": ("prompt-lookup", 4),
               "prompt lookup, k 8": ("prompt-lookup", 8), "prompt lookup, k 16": ("prompt-lookup", 16),
               "draft model, k 2": ("draft-model", 2), "draft model, k 4": ("draft-model", 4)}
    if args.only:
        keep = {"plain", *(name.strip() for name in args.only.split(";"))}
        runners = {name: how for name, how in runners.items() if name in keep}
    peer = MlxLm(folder, draft) if args.mlx_lm else None
    peer_runs = ["mlx-lm plain", "mlx-lm draft model, k 3"] if peer else []
    results: dict[str, list[dict]] = {name: [] for name in [*runners, *peer_runs]}
    ours.run(prompt, 8, None, None)  # warm-up: first-call costs out of the rounds
    for r in range(args.rounds):
        for name in round_order([*runners, *peer_runs], r):
            if name in runners:
                results[name].append(ours.run(prompt, args.max_tokens, *runners[name]))
            else:
                results[name].append(peer.run(prompt, args.mlx_lm_tokens, draft="draft" in name))
            print(f"round {r}: {name}: {results[name][-1]['tps']:.2f} tok/s", flush=True)

    plain = results["plain"][0]["tokens"]
    base = statistics.median(x["tps"] for x in results["plain"])
    peer_base = statistics.median(x["tps"] for x in results["mlx-lm plain"]) if peer else None
    print(f"\n{len(prompt)}-token prompt, {len(plain)} tokens, {args.rounds} interleaved rounds, "
          f"{platform.machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("| runner | decode tok/s | vs its plain | drafts kept | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        tps = statistics.median(x["tps"] for x in runs)
        ref = peer_base if name.startswith("mlx-lm") else base
        drafted, kept = sum(x["drafted"] for x in runs), sum(x["kept"] for x in runs)
        same = all(x["tokens"] == plain[:len(x["tokens"])] for x in runs)
        share = f"{kept}/{drafted} ({kept / drafted:.0%})" if drafted else "-"
        print(f"| {name} | {tps:.2f} | {tps / ref:.2f}x | {share} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
