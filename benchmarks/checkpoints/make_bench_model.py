"""Random-weight checkpoints for speed runs: a scaled-down Qwen MoE and a dense Qwen2 of the same total size.

    python -m benchmarks.checkpoints.make_bench_model OUT_DIR [--kind moe|dense|both] [--layers 6]

The MoE is Qwen1.5-MoE-A2.7B's design at hidden 1024: 60 experts, 4 per token (704 wide), a shared expert
four experts wide, multi-head attention. The dense model has the same hidden size, layers and total
parameter count, its MLP as wide as that takes. Both use the tiny tokenizer (tiny_tokenizer.py, 512 ids), so the
vocabulary projection is negligible and the decoder layers decide the speed. Weights are random (speed
does not depend on them); every tensor the config asks for (ModelArgs.weight_shapes) is written, float32.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.common import prog

COMMON = dict(vocab_size=512, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
              rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
              bos_token_id=507, eos_token_id=509, torch_dtype="float32")
MOE = dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], intermediate_size=2816,
           moe_intermediate_size=704, shared_expert_intermediate_size=2816, num_experts=60, num_experts_per_tok=4,
           norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])


def dense_config(moe_total: int, layers: int) -> dict:
    """A qwen2 config with the MoE's hidden size and layers whose MLP width makes the totals equal."""
    from qwen_mlx.config import ModelArgs

    probe = ModelArgs.from_dict(dict(COMMON, model_type="qwen2", num_hidden_layers=layers, intermediate_size=64))
    rest = sum(probe.parameter_counts().values()) - layers * 3 * COMMON["hidden_size"] * 64
    width = (moe_total - rest) // (layers * 3 * COMMON["hidden_size"])
    return dict(COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=layers,
                intermediate_size=int(width // 64 * 64))


def write_model(folder: Path, config: dict, seed: int = 0) -> int:
    from safetensors.numpy import save_file

    from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer
    from qwen_mlx.config import ModelArgs

    args = ModelArgs.from_dict(config)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in args.weight_shapes().items():
        if key.endswith("norm.weight"):
            tensors[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # the init scale of a trained model's matrices, roughly
            tensors[key] = (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tiny_tokenizer(folder, vocab_size=config["vocab_size"])
    return sum(t.size for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(prog=prog(__spec__.name), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--kind", choices=["moe", "dense", "both"], default="both")
    p.add_argument("--layers", type=int, default=6)
    a = p.parse_args()
    from qwen_mlx.config import ModelArgs

    moe = dict(COMMON, **MOE, num_hidden_layers=a.layers)
    moe_args = ModelArgs.from_dict(moe)
    total = sum(moe_args.parameter_counts().values())
    if a.kind in ("moe", "both"):
        write_model(a.out / "moe", moe)
        print(f"{a.out / 'moe'}: {total / 1e6:.0f}M parameters, {moe_args.active_parameters() / 1e6:.0f}M active")
    if a.kind in ("dense", "both"):
        dense = dense_config(total, a.layers)
        n = write_model(a.out / "dense", dense)
        print(f"{a.out / 'dense'}: {n / 1e6:.0f}M parameters (MLP {dense['intermediate_size']} wide), all active")


if __name__ == "__main__":
    main()
