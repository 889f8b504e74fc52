"""What a quantized KV cache (--kv-bits) costs in quality and saves in memory, on the parity suite's text.

    python -m benchmarks.quality.kv_quality [--model FOLDER] [--text-tokens 1024] [--bits 8,4]

Teacher-forced over the first --text-tokens tokens of the stdlib colorsys.py (benchmarks/quality/parity.py), 256
positions per forward through the cache, float32 weights: perplexity, its ratio to the float cache's, top-1
agreement and max |logit diff| against the float cache; then the KV cache's bytes per token (measured from
the cache after the run, and per dtype by formula).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from benchmarks.common import prog, real_checkpoint
from benchmarks.quality import parity  # imports qwen_mlx first, which loads OpenBLAS


def position_logits(model, ids, kv_bits, out_cache):
    import mlx.core as mx
    import numpy as np

    cache = model.make_cache(kv_bits)
    out_cache.append(cache)
    for s in range(0, len(ids), parity.CHUNK):
        out = model(mx.array([list(ids[s:s + parity.CHUNK])], dtype=mx.int32), cache, last_only=False)
        yield np.array(out[0].astype(mx.float32))


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--text-tokens", type=int, default=parity.TEXT_TOKENS)
    p.add_argument("--bits", default="8,4")
    a = p.parse_args()
    from qwen_mlx.backends.mlx import MLXBackend
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.tokenizer import Tokenizer

    folder = Path(a.model) if a.model else real_checkpoint("float32")
    ids = parity.text_ids(Tokenizer.from_folder(folder), a.text_tokens)
    backend = MLXBackend(prepare_model(str(folder)), "float32")
    model, args = backend.model, backend.args
    caches: list = []
    ref = parity.teacher_forced("float KV", position_logits(model, ids, None, caches), ids, keep=True)
    rows = [(ref, None)]
    for bits in map(int, a.bits.split(",")):
        rows.append((parity.teacher_forced(f"{bits}-bit KV", position_logits(model, ids, bits, caches), ids, ref),
                     bits))
    print(f"{folder.name}; first {len(ids)} tokens of colorsys.py (Python {platform.python_version()}, token digest "
          f"{parity.text_digest(ids)}), {parity.CHUNK} positions per forward; float32 weights\n")
    print("| KV cache | perplexity | vs float | top-1 agreement | max abs logit diff | KV bytes/token (measured) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (q, bits), cache in zip(rows, caches):
        per_token = sum(c.nbytes if bits else c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes
                        for c in cache) / len(ids)
        print(f"| {q.name} | {q.perplexity:.4f} | x{q.perplexity_ratio(ref):.4f} | {q.top1_agreement:.2%} | "
              f"{q.max_abs_diff:.3g} | {per_token:,.0f} |")
    n = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim  # values per token, keys and values
    print(f"\nKV per token by formula ({n:,} values: 2 x {args.num_hidden_layers} layers x "
          f"{args.num_key_value_heads} kv heads x {args.head_dim}; group 64, scales and biases in the activations' dtype):")
    for label, size, scale in (("float32", 4, 4), ("bfloat16", 2, 2)):
        print(f"- {label} cache: {n * size / 1024:.1f} KiB; 8-bit: {n * (1 + 2 * scale / 64) / 1024:.2f} KiB; "
              f"4-bit: {n * (0.5 + 2 * scale / 64) / 1024:.2f} KiB")


if __name__ == "__main__":
    main()
