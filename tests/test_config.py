"""config.json parsing and RoPE frequencies against HF transformers' own computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError

BASE = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
            rope_theta=10000.0)

SCALINGS = [
    None,
    {"type": "linear", "factor": 2.0},
    {"type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5's 128K recipe
]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("seq_len", [None, 200])
def test_rope_frequencies_match_transformers(scaling, seq_len):
    import torch
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = dict(BASE, rope_scaling=scaling)
    hf = Qwen2Config(**config)
    kind = hf.rope_parameters.get("rope_type", "default")
    if kind == "default":
        want, want_factor = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32)), 1.0
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq_len)
    got, factor = ModelArgs.from_dict(config).rope_frequencies(seq_len)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert factor == pytest.approx(want_factor)


def test_transformers5_rope_parameters_and_derived_fields():
    args = ModelArgs.from_dict(dict(BASE, rope_theta=None, num_key_value_heads=None,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                     "original_max_position_embeddings": 64}))
    assert args.rope_theta == 1e6 and args.rope_type == "yarn"
    assert args.num_key_value_heads == 4 and args.head_dim == 32
    assert args.context_length == 256  # yarn stretches the original 64 positions four times


def test_sliding_window_caps_the_context():
    args = ModelArgs.from_dict(dict(BASE, use_sliding_window=True, sliding_window=32, max_window_layers=1))
    assert args.sliding_layers == [1] and args.context_length == 32
    assert ModelArgs.from_dict(dict(BASE, use_sliding_window=False, sliding_window=32)).context_length == 64


# Qwen2.5-7B-Instruct-1M's config, less the sizes.
DCA_1M = dict(max_position_embeddings=1010000, rope_theta=1e7,
              dual_chunk_attention_config={"chunk_size": 262144, "local_size": 8192,
                                           "original_max_position_embeddings": 262144})


def test_dual_chunk_attention_reaches_the_full_context():
    """Dual Chunk Attention runs (qwen_mlx/dual_chunk.py): no cap; a malformed config is refused at load."""
    args = ModelArgs.from_dict(dict(BASE, **DCA_1M))
    assert args.context_length == 1010000 and args.context_caps() == []
    dc = args.dual_chunk
    assert (dc.chunk_len, dc.inter_position, dc.plain_up_to) == (253952, 262144, 253952)
    assert dc.scaling([0, 262143, 4 * 262144 - 1]).tolist() == pytest.approx([1, 1, 0.1 * np.log(4) + 1])
    assert ModelArgs.from_dict(BASE).dual_chunk is None
    for bad in ({"local_size": 8}, {"chunk_size": 8, "local_size": 8}, {"chunk_size": 16, "local_size": -1}, [1]):
        with pytest.raises(QwenError, match="dual_chunk_attention_config"):
            ModelArgs.from_dict(dict(BASE, dual_chunk_attention_config=bad))
    with pytest.raises(QwenError, match="dynamic"):
        ModelArgs.from_dict(dict(BASE, **DCA_1M, rope_scaling={"type": "dynamic", "factor": 2.0}))


def test_weight_shapes_and_parameter_counts():
    tied = ModelArgs.from_dict(dict(BASE, tie_word_embeddings=True))
    untied = ModelArgs.from_dict(BASE)
    assert "lm_head.weight" not in tied.weight_shapes()
    assert untied.weight_shapes()["lm_head.weight"] == (100, 128)
    assert untied.weight_shapes()["model.layers.1.self_attn.k_proj.weight"] == (64, 128)
    assert untied.parameter_counts()["lm_head"] == 100 * 128 and tied.parameter_counts()["lm_head"] == 0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"hidden_size": None}, "hidden_size must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "'longrope' is not supported"),
    ({"rope_scaling": {"type": "linear"}}, "needs a positive 'factor'"),
])
def test_bad_configs(change, message):
    with pytest.raises(QwenError, match=message):
        ModelArgs.from_dict(dict(BASE, **change))


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(QwenError, match="no config.json"):
        ModelArgs.from_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QwenError, match="corrupt JSON"):
        ModelArgs.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "vocab_size"}))
    with pytest.raises(QwenError, match="missing vocab_size"):
        ModelArgs.from_folder(tmp_path)


def test_a_hybrid_without_its_attention_gate_is_refused():
    """attn_output_gate false would make q_proj half as wide and drop the gate: other math, so refused."""
    hybrid = dict(BASE, model_type="qwen3_5_text", num_key_value_heads=2, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, full_attention_interval=2)
    assert ModelArgs.from_dict(dict(hybrid, attn_output_gate=True)).hybrid
    with pytest.raises(QwenError, match="attn_output_gate False is not supported"):
        ModelArgs.from_dict(dict(hybrid, attn_output_gate=False))
