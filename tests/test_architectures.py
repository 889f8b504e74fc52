"""Qwen2-MoE, Qwen3 and Qwen3-MoE against HF transformers' own Qwen2MoeForCausalLM, Qwen3ForCausalLM and
Qwen3MoeForCausalLM, on the tiny random configs of benchmarks/checkpoints/tiny_models.py (ARCH_CONFIGS): config and
parameter counts, loader errors, MLX float32 logits and greedy decoding with the KV cache, quantized
experts, and that only the routed experts are ever read. The torch twin and ONNX export are checked on the
same configs further down (and in tests/test_onnx_export.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen_mlx.checkpoint import prepare_model
from qwen_mlx.config import ModelArgs
from qwen_mlx.errors import QwenError
from qwen_mlx.backends.base import Session, greedy_tokens
from tests.support.gguf import write_gguf_from_hf
from benchmarks.quality.reference import backend_logits, load_reference, reference_greedy, reference_logits
from benchmarks.checkpoints.tiny_models import ARCH_CONFIGS

RNG = np.random.default_rng(99)
# 70 prompt tokens: prefill sends >= 64 (token, expert) pairs, so MLX's sorted gather path runs; each
# cached step then takes the unsorted one.
PROMPT = RNG.integers(0, 500, size=70).tolist()
STEPS = RNG.integers(0, 500, size=12).tolist()
MOE = [n for n, c in ARCH_CONFIGS.items() if c["model_type"].endswith("_moe")]


@pytest.fixture(scope="session")
def references(tiny_model):
    """name -> HF logits and HF's 32 greedy tokens, computed once per session."""
    cache: dict[str, tuple[np.ndarray, list[int]]] = {}

    def get(name: str) -> tuple[np.ndarray, list[int]]:
        if name not in cache:
            model = load_reference(tiny_model(name))
            cache[name] = reference_logits(model, PROMPT, STEPS), reference_greedy(model, PROMPT[:20], 32)
        return cache[name]

    return get


# ---- config, parameter counts, loader errors ---------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_parameter_counts_match_transformers(tiny_model, name):
    folder = tiny_model(name)
    args = ModelArgs.from_folder(folder)
    ref = load_reference(folder)
    # A size-0 shared expert leaves its gate behind in HF, multiplying zeros: not counted as a parameter.
    dead = "shared_expert_gate" if args.model_type == "qwen2_moe" and not args.shared_expert else None
    want = sum(p.numel() for key, p in ref.named_parameters() if not (dead and dead in key))
    assert sum(args.parameter_counts().values()) == want
    counts = args.parameter_counts()
    if args.num_experts:
        moe_layers = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts")]
        assert args.moe_layers == moe_layers and moe_layers
        # Active: everything but the routed experts a token is not sent to.
        per_expert = 3 * args.hidden_size * args.moe_intermediate_size
        assert counts["experts"] == len(moe_layers) * args.num_experts * per_expert
        unused = len(moe_layers) * (args.num_experts - args.num_experts_per_tok) * per_expert
        assert args.active_parameters() == sum(counts.values()) - unused
    else:
        assert args.active_parameters() == sum(counts.values()) and counts["experts"] == 0


def test_config_flags():
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100)
    q3 = ModelArgs.from_dict(dict(base, model_type="qwen3"))
    assert q3.head_dim == 128 and q3.qk_norm and not q3.qkv_has_bias and not q3.o_has_bias  # HF's defaults
    assert ModelArgs.from_dict(dict(base, model_type="qwen3", attention_bias=True)).o_has_bias
    moe = ModelArgs.from_dict(dict(base, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2,
                                   moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert moe.moe_layers == [1] and moe.qkv_has_bias and moe.shared_expert
    assert moe.shared_expert_intermediate_size == 5632  # Qwen2MoeConfig's default when config.json omits it
    shapes = moe.weight_shapes()
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.1.mlp.gate.weight"] == (8, 64)
    assert shapes["model.layers.1.mlp.shared_expert_gate.weight"] == (1, 64)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (128, 64)
    assert "model.layers.3.mlp.experts.0.up_proj.weight" not in shapes
    q3moe = ModelArgs.from_dict(dict(base, model_type="qwen3_moe", num_local_experts=4, num_experts_per_tok=1,
                                     moe_intermediate_size=16))
    assert q3moe.num_experts == 4 and not q3moe.shared_expert and q3moe.moe_layers == [0, 1, 2, 3]
    assert "model.layers.0.self_attn.q_norm.weight" in q3moe.weight_shapes()


# Published sizes (total, active per token, in billions) from the model cards, against their config.json.
PUBLISHED = {
    "Qwen1.5-MoE-A2.7B": (dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                               num_key_value_heads=16, intermediate_size=5632, moe_intermediate_size=1408,
                               shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                               vocab_size=151936), 14.3, 2.7),
    "Qwen2-57B-A14B": (dict(model_type="qwen2_moe", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, intermediate_size=18944, moe_intermediate_size=2560,
                            shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
                            vocab_size=151936), 57.4, 14.2),
    "Qwen3-30B-A3B": (dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                           num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936), 30.5, 3.3),
    "Qwen3-0.6B": (dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                        tie_word_embeddings=True), 0.6, 0.6),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_total_and_active_parameters(name):
    config, total, active = PUBLISHED[name]
    args = ModelArgs.from_dict(config)
    # Model cards round down as often as to nearest (Qwen3-30B-A3B: 3.35B active is "A3B", "3.3B").
    assert abs(sum(args.parameter_counts().values()) / 1e9 - total) < 0.06
    assert abs(args.active_parameters() / 1e9 - active) < 0.06


def test_info_shows_experts_and_active_parameters(tiny_model, capsys):
    import cli

    assert cli.main(["info", "--model", str(tiny_model("qwen2moe-norm-mlponly"))]) == 0
    out = capsys.readouterr().out
    args = ModelArgs.from_folder(tiny_model("qwen2moe-norm-mlponly"))
    assert "architecture   qwen2_moe" in out and "8 per MoE layer, 3 per token (renormalized weights)" in out
    assert "MoE in 1 of 2 layers, dense MLP in [1]" in out and "shared expert 48 wide" in out
    assert f"active/token   {args.active_parameters():>14,}" in out and "read per token" in out


@pytest.mark.parametrize("change,message", [
    ({"model_type": "qwen4"}, "unsupported model_type 'qwen4'"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok \\(9\\) must be between 1 and num_experts \\(8\\)"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer"),
    ({"mlp_only_layers": "all"}, "mlp_only_layers must be a list"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"model_type": "qwen3"}, "model_type 'qwen3' has no experts"),
])
def test_bad_moe_configs(change, message):
    config = dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=100, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32)
    with pytest.raises(QwenError, match=message):
        ModelArgs.from_dict(dict(config, **change))


def _copy_without(src: Path, dst: Path, drop=lambda key: False, config_change: dict | None = None) -> Path:
    """A copy of a checkpoint folder with some tensors dropped and/or config.json edited."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not drop(k)}, str(dst / "model.safetensors"))
    if config_change:
        config = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(config, **config_change)))
    return dst


def test_loader_errors(tiny_model, tmp_path):
    src = tiny_model("qwen3moe-norm")  # 8 experts per MoE layer
    missing = _copy_without(src, tmp_path / "missing", lambda k: k == "model.layers.1.mlp.experts.5.up_proj.weight")
    with pytest.raises(QwenError, match="missing tensors: model.layers.1.mlp.experts.5.up_proj.weight"):
        prepare_model(str(missing))
    fewer = _copy_without(src, tmp_path / "fewer", lambda k: ".mlp.experts.7." in k)
    with pytest.raises(QwenError, match="layer 0 holds 7 experts, but config.json says num_experts is 8"):
        prepare_model(str(fewer))
    more = _copy_without(src, tmp_path / "more", config_change={"num_local_experts": 6})
    with pytest.raises(QwenError, match="layer 0 holds 8 experts, but config.json says num_experts is 6"):
        prepare_model(str(more))
    unknown = _copy_without(src, tmp_path / "unknown", config_change={"model_type": "llama"})
    with pytest.raises(QwenError, match="unsupported model_type 'llama'"):
        prepare_model(str(unknown))
    dense = _copy_without(tiny_model("qwen3-untied"), tmp_path / "no-qnorm", lambda k: k.endswith("q_norm.weight"))
    with pytest.raises(QwenError, match="missing tensors: model.layers.0.self_attn.q_norm.weight"):
        prepare_model(str(dense))


# ---- MLX ----------------------------------------------------------------------------------------------

def mlx_backend(folder: Path, quantize: int | None = None):
    from qwen_mlx.backends.mlx import MLXBackend

    return MLXBackend(prepare_model(str(folder)), "float32", quantize)


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_mlx_logits_match_transformers(tiny_model, references, name):
    want, _ = references(name)
    got = backend_logits(Session(mlx_backend(tiny_model(name))), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_mlx_greedy_32_steps_match_transformers(tiny_model, references, name):
    _, want = references(name)
    assert greedy_tokens(Session(mlx_backend(tiny_model(name))), PROMPT[:20], 32) == want


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_quantized_experts(tiny_model, bits):
    """--quantize covers the experts (QuantizedSwitchLinear, gather_qmm): the quantized model computes
    what a float32 model holding the dequantized weights computes. Router and shared-expert gate stay
    float: they pick the experts."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from qwen_mlx.models.qwen2 import Linear, QuantizedSwitchLinear, SwitchLinear

    folder = tiny_model("qwen3moe-q64")
    quant = mlx_backend(folder, bits)
    modules = dict(quant.model.named_modules())
    assert not [p for p, m in modules.items() if isinstance(m, SwitchLinear)]
    switches = [m for m in modules.values() if isinstance(m, QuantizedSwitchLinear)]
    assert len(switches) == 3 and all(m.bits == bits and m.group_size == 64 for m in switches)
    routers = [p for p, m in modules.items() if p.endswith("mlp.gate")]
    assert routers and all(type(modules[p]) is Linear for p in routers)
    assert not [p for p, m in modules.items() if type(m) in (Linear, nn.Embedding) and p not in routers]

    dequant = mlx_backend(folder)
    weights = {path + ".weight": mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
               for path, m in modules.items()
               if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))}
    assert set(weights) <= set(dict(tree_flatten(dequant.model.parameters())))
    dequant.model.load_weights(list(weights.items()), strict=False)
    got = backend_logits(Session(quant), PROMPT, STEPS)
    want = backend_logits(Session(dequant), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("sort_above", [64, 1])
def test_mlx_reads_only_the_routed_experts(tiny_model, monkeypatch, sort_above):
    """Experts no token is routed to are set to NaN: the logits stay finite and unchanged, so neither the
    unsorted nor the sorted gather path ever computes them (a dense all-experts product would be NaN)."""
    import mlx.core as mx

    from qwen_mlx.models import qwen2 as mlx_model

    monkeypatch.setattr(mlx_model.Experts, "sort_above", sort_above)
    used: dict[int, set[int]] = {}
    original = mlx_model.Experts.__call__

    def record(self, x, indices):
        used.setdefault(id(self), set()).update(np.array(indices).ravel().tolist())
        return original(self, x, indices)

    prompt, steps = PROMPT[:3], STEPS[:2]
    backend = mlx_backend(tiny_model("qwen3moe-q64"))  # 16 experts, 4 per token
    monkeypatch.setattr(mlx_model.Experts, "__call__", record)
    want = backend_logits(Session(backend), prompt, steps)
    monkeypatch.setattr(mlx_model.Experts, "__call__", original)
    poisoned = 0
    for layer in backend.model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        unused = np.array([j not in used[id(experts)] for j in range(16)])
        assert unused.any()
        poisoned += int(unused.sum())
        for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
            proj.weight = mx.where(mx.array(unused)[:, None, None], mx.array(np.nan, mx.float32), proj.weight)
    got = backend_logits(Session(backend), prompt, steps)
    assert poisoned and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name", ["qwen2moe-shared", "qwen3moe-q64"])
def test_batched_engine_gives_each_request_its_tokens_alone(tiny_model, backend, name):
    """The server's continuous batching (left-padded rows decoded together) on MoE models: every row's
    greedy tokens equal the ones it gets alone."""
    import export  # noqa: F401  (registers the torch backend)
    from qwen_mlx.backends import load
    from qwen_mlx.backends.batching import batch_backend
    from qwen_mlx.engine import Engine, Request, Token, run_requests
    from qwen_mlx.sampling import SamplingParams

    loaded = load(backend, str(tiny_model(name)), "float32")
    loaded.tokenizer.eos_token_ids = frozenset()
    prompts = [PROMPT[: 5 + 9 * i] for i in range(4)]
    alone = [greedy_tokens(Session(loaded.backend), p, 8) for p in prompts]
    engine = Engine(batch_backend(loaded.backend, 4), loaded.tokenizer, prefill_chunk=16).start()
    try:
        events = run_requests(engine, [Request(p, SamplingParams(temperature=0), 8 - i) for i, p in enumerate(prompts)])
    finally:
        engine.shutdown(0)
    assert [[e.id for e in ev if isinstance(e, Token)] for ev in events] == [a[:8 - i] for i, a in enumerate(alone)]


# ---- the PyTorch twin --------------------------------------------------------------------------------

def torch_backend(folder: Path):
    from export.backends.torch import TorchBackend

    return TorchBackend(prepare_model(str(folder)))


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_twin_logits_match_transformers(tiny_model, references, name):
    want, _ = references(name)
    got = backend_logits(Session(torch_backend(tiny_model(name))), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_twin_greedy_32_steps_match_transformers(tiny_model, references, name):
    _, want = references(name)
    assert greedy_tokens(Session(torch_backend(tiny_model(name))), PROMPT[:20], 32) == want


def test_twin_reads_only_the_routed_experts(tiny_model):
    """As for MLX: NaN in every expert no token was routed to leaves the twin's logits unchanged."""
    import torch

    from export.models.qwen2 import Experts

    backend = torch_backend(tiny_model("qwen3moe-q64"))
    used: dict[int, set[int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: used.setdefault(id(m), set()).update(a[1].flatten().tolist()))
             for m in backend.model.modules() if isinstance(m, Experts)]
    prompt, steps = PROMPT[:3], STEPS[:2]
    want = backend_logits(Session(backend), prompt, steps)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in backend.model.modules():
            if isinstance(m, Experts):
                unused = torch.tensor([j not in used[id(m)] for j in range(16)])
                assert unused.any()
                for proj in (m.gate_proj, m.up_proj, m.down_proj):
                    proj.weight[unused] = float("nan")
    backend.trim(0)
    got = backend_logits(Session(backend), prompt, steps)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---- ONNX: one float32 export per architecture, and int4 experts -------------------------------------

ONNX_CONFIGS = ["qwen2moe-shared", "qwen3-bias-tied", "qwen3moe-q64"]  # qwen2: tests/test_onnx_export.py
# The MoE graph each is exported with: the default (com.microsoft MoE, export/moe_onnx.py) on the model with a
# shared expert, standard ops on the other; one trace each.
ONNX_MOE_GRAPH = {"qwen2moe-shared": "fused", "qwen3-bias-tied": "fused", "qwen3moe-q64": "standard"}


@pytest.fixture(scope="module")
def onnx_exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """name -> export folder (float32, validated against the twin by export_onnx itself). The int4 variants
    of qwen3moe-q64 (GatherBlockQuantized experts) and qwen2moe-shared (QMoE) are quantized from the same
    traced graphs (quantize_int4), saving a second trace."""
    import onnx

    from export.onnx_export import export_onnx, quantize_int4

    root = tmp_path_factory.mktemp("arch-onnx")
    out = {name: root / name for name in ONNX_CONFIGS}
    for name in ONNX_CONFIGS:
        export_onnx(prepare_model(str(tiny_model(name))), out[name], moe=ONNX_MOE_GRAPH[name])
    for name in ("qwen3moe-q64", "qwen2moe-shared"):
        q4 = quantize_int4(onnx.load(str(out[name] / "onnx/model.onnx")))
        onnx.save_model(q4, str(out[name] / "onnx/model_q4.onnx"))
    return out


def onnx_backend(folder: Path, quantize: str | None = None):
    from export.backends.onnx import OnnxBackend

    return OnnxBackend(folder, quantize=quantize, provider="CPUExecutionProvider")


@pytest.mark.parametrize("name", ONNX_CONFIGS)
def test_onnx_logits_and_greedy_match_transformers(onnx_exports, references, name):
    import json

    want_logits, want_greedy = references(name)
    backend = onnx_backend(onnx_exports[name])
    assert np.abs(backend_logits(Session(backend), PROMPT, STEPS) - want_logits).max() < 1e-4
    assert greedy_tokens(Session(backend), PROMPT[:20], 32) == want_greedy
    genai = json.loads((onnx_exports[name] / "genai_config.json").read_text())
    assert genai["model"]["type"] == ("qwen3" if name.startswith("qwen3") else "qwen2")


def test_onnx_moe_graph_gathers_experts(onnx_exports):
    """Standard ops only: the experts are Gathers of the stacked [X, out, in] weights followed by MatMuls,
    the router a TopK; no com.microsoft op in the float32 graph."""
    import onnx

    model = onnx.load(str(onnx_exports["qwen3moe-q64"] / "onnx/model.onnx"))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and len(inits.get(n.input[0], [])) == 3]
    assert sorted(n.input[0] for n in gathers) == [f"model.layers.1.mlp.experts.{p}_proj.weight"
                                                  for p in ("down", "gate", "up")]
    assert inits["model.layers.1.mlp.experts.down_proj.weight"] == [16, 64, 64]
    assert sum(n.op_type == "TopK" for n in model.graph.node) == 1  # layer 0 is an mlp_only layer
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]


def test_onnx_int4_covers_the_experts(onnx_exports, tiny_model):
    """int4: experts become GatherBlockQuantized (4-bit along `in`, block 32), dense matrices MatMulNBits,
    the router stays a float MatMul. The int4 experts decode (by our own reading of the format) to the
    float weights within a quantization step, onnxruntime's GatherBlockQuantized computes exactly that
    decoding, and the whole model stays within export_onnx's own int4 tolerance of the float twin."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from export.onnx_export import validate_export

    folder = onnx_exports["qwen3moe-q64"]
    model = onnx.load(str(folder / "onnx/model_q4.onnx"))
    float_model = onnx.load(str(folder / "onnx/model.onnx"))
    floats = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    # one GatherBlockQuantized per layer's expert stacks (3-D data), plus the tied embedding's (2-D rows of
    # the lm_head's packed int4 weight, export/quantize.py) when the model ties them
    expert_gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"
                      and n.input[0] in inits and len(inits[n.input[0]].dims) == 3]
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    assert len(expert_gathers) == 3 and ops.count("GatherBlockQuantized") == 3 + tied and "MatMulNBits" in ops
    router = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith("mlp.gate.weight.T")]
    assert len(router) == 1 and router[0].input[1] in inits

    decoded = {}
    for node in expert_gathers:
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["gather_axis"], attrs["quantize_axis"], attrs["block_size"]) == (0, 2, 32)
        data, scales = inits[node.input[0]], numpy_helper.to_array(inits[node.input[2]])
        assert data.data_type == onnx.TensorProto.INT4
        X, O, I = data.dims
        packed = np.frombuffer(data.raw_data, np.uint8)
        nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[: X * O * I].astype(np.int8)
        q = np.where(nibbles > 7, nibbles - 16, nibbles).reshape(X, O, I // 32, 32)
        w = (q * scales[..., None]).reshape(X, O, I)
        original = floats[node.input[0].removesuffix("_Q4")]
        # Scales are signed (symmetric int4 maps the largest magnitude to -8, so the other end clips at +7):
        # each weight is within one step, and most within half a step.
        step = np.repeat(np.abs(scales), 32, axis=-1)
        assert np.all(np.abs(w - original) <= step + 1e-6)
        assert np.mean(np.abs(w - original) <= step / 2 + 1e-6) > 0.98
        decoded[node.output[0]] = (w.astype(np.float32), node)

    # The same graph with each GatherBlockQuantized replaced by a plain Gather of our decoded weights.
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    for i, node in enumerate(plain.graph.node):
        if node.output[0] in decoded:  # the experts (the tied embedding's own decoding: test_onnx_quantize.py)
            w, _ = decoded[node.output[0]]
            name = node.input[0] + "_decoded"
            plain.graph.initializer.append(numpy_helper.from_array(w, name))
            plain.graph.node[i].CopyFrom(helper.make_node("Gather", [name, node.input[1]], list(node.output), axis=0))

    def logits(proto) -> np.ndarray:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([PROMPT[:9]], np.int64), "attention_mask": np.ones((1, 9), np.int64),
                "position_ids": np.arange(9)[None]}
        for inp in session.get_inputs()[3:]:
            feed[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        return session.run(["logits"], feed)[0]

    np.testing.assert_allclose(logits(plain), logits(model), atol=1e-5)
    result = validate_export(prepare_model(str(tiny_model("qwen3moe-q64"))), folder, "float32", "int4")
    assert result["greedy_agreement"] >= 0.5


def test_onnx_fused_moe_graph(onnx_exports):
    """--moe fused (the default): each MoE layer's routed experts are one com.microsoft MoE node reading the
    router's logits, gate/up interleaved [X, 2I, E] and down [X, E, I]; the shared expert and its sigmoid
    gate stay standard ops; no TopK or expert Gather is left."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_exports["qwen2moe-shared"] / "onnx/model.onnx"))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    moes = [n for n in model.graph.node if n.op_type == "MoE"]
    assert [n.domain for n in moes] == ["com.microsoft"] * 2
    attrs = {a.name: helper.get_attribute_value(a) for a in moes[0].attribute}
    assert (attrs["k"], attrs["activation_type"], attrs["swiglu_fusion"], attrs["normalize_routing_weights"]) == \
        (2, b"swiglu", 1, 0)
    assert inits[moes[0].input[2]] == [4, 64, 48] and inits[moes[0].input[4]] == [4, 48, 32]
    assert not [n for n in model.graph.node if n.op_type == "Gather" and len(inits.get(n.input[0], [])) == 3]
    assert not [n for n in model.graph.node if n.op_type == "TopK"]
    assert any(n.op_type == "Sigmoid" for n in model.graph.node)  # the shared expert's gate, outside the op


def test_onnx_int4_fused_experts_are_qmoe(onnx_exports, tiny_model):
    """int4 of the fused graph: each MoE node becomes QMoE with 4-bit experts (blocks of 16 here: hidden 48
    is no multiple of 32). onnxruntime's QMoE computes exactly the float MoE op on our own decoding of the
    codes (float activations: no accuracy_level, which onnxruntime 1.30 refuses), with
    the full softmax as router_weights since norm_topk_prob is off; the model's logits stay within
    export_onnx's int4 bound of the float twin's (greedy agreement is not asked of this random 48-wide model,
    whose 4-bit rounding flips near-tied tokens: 44% measured)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from export.moe_onnx import dequantize_block_int4
    from export.onnx_validate import TOLERANCE, measure_export

    folder = onnx_exports["qwen2moe-shared"]
    model = onnx.load(str(folder / "onnx/model_q4.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qmoes = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(qmoes) == 2 and not [n for n in model.graph.node if n.op_type == "MoE"]
    decoded = onnx.ModelProto()
    decoded.CopyFrom(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type != "QMoE":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["expert_weight_bits"], attrs["block_size"]) == (4, 16) and "accuracy_level" not in attrs
        assert node.input[14] and inits[node.input[2]].dtype == np.uint8
        w1 = dequantize_block_int4(inits[node.input[2]], inits[node.input[3]])
        w2 = dequantize_block_int4(inits[node.input[5]], inits[node.input[6]])
        names = [node.input[2] + "_decoded", node.input[5] + "_decoded"]
        decoded.graph.initializer.extend([numpy_helper.from_array(w1, names[0]), numpy_helper.from_array(w2, names[1])])
        keep = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()
                if k in ("k", "activation_type", "swiglu_fusion", "activation_alpha", "activation_beta",
                         "normalize_routing_weights")}
        decoded.graph.node[i].CopyFrom(helper.make_node("MoE", [node.input[0], node.input[1], names[0], "", names[1]],
                                                        list(node.output), domain="com.microsoft", **keep))

    def logits(proto) -> np.ndarray:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([PROMPT[:9]], np.int64), "attention_mask": np.ones((1, 9), np.int64),
                "position_ids": np.arange(9)[None]}
        for inp in session.get_inputs()[3:]:
            feed[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        return session.run(["logits"], feed)[0]

    np.testing.assert_allclose(logits(model), logits(decoded), atol=1e-4)
    result = measure_export(prepare_model(str(tiny_model("qwen2moe-shared"))), folder, "float32", "int4")
    assert result["relative_diff"] <= TOLERANCE["int4"][0]


def test_quantize_block_int4_round_trip():
    """Our 4-bit coding: within one step of the weight everywhere (the largest magnitude maps to -8, so its
    opposite clips at +7), most within half a step, and each block's extreme exact."""
    from export.moe_onnx import dequantize_block_int4, qmoe_block_size, quantize_block_int4

    w = np.random.default_rng(1).standard_normal((3, 8, 64)).astype(np.float32)
    codes, scales = quantize_block_int4(w, 32)
    assert codes.shape == (3, 8, 32) and scales.shape == (3, 8, 2)
    back = dequantize_block_int4(codes, scales)
    step = np.repeat(np.abs(scales), 32, axis=-1)
    assert np.all(np.abs(back - w) <= step + 1e-6) and np.mean(np.abs(back - w) <= step / 2 + 1e-6) > 0.98
    peak = np.abs(w.reshape(3, 8, 2, 32)).max(-1)
    np.testing.assert_allclose(np.abs(back.reshape(3, 8, 2, 32)).max(-1), peak, rtol=1e-6)
    assert (qmoe_block_size(1024, 704), qmoe_block_size(48, 32)) == (32, 16)
    with pytest.raises(ValueError, match="--moe standard"):
        qmoe_block_size(24, 40)


# ---- GGUF: tiny GGUFs written from the tiny HF models with gguf's own writer and tensor-name map -------
# (tests/support/gguf.py: write_gguf_from_hf)

# name -> (Q8_0 quantize the expert stacks, store the shared-expert gate as a vector)
GGUF_CASES = {"qwen2moe-shared": (False, True), "qwen2moe-norm-mlponly": (False, False),
              "qwen3-bias-tied": (False, False), "qwen3moe-q64": (True, False)}


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_conversion_equals_the_original(tiny_model, references, tmp_path, monkeypatch, name):
    """convert_gguf gives back the original checkpoint: the same config (ModelArgs), every tensor (experts
    split back per expert; Q8_0 stacks equal gguf's dequantization), and, through `--model x.gguf`, MLX
    logits equal to transformers' on the original folder."""
    from safetensors.numpy import load_file

    from qwen_mlx.formats.gguf import convert_gguf

    folder = tiny_model(name)
    quantized, vector_gate = GGUF_CASES[name]
    path = tmp_path / f"{name}.gguf"
    stored = write_gguf_from_hf(folder, path, quantized, vector_gate)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    original, converted = ModelArgs.from_folder(folder), ModelArgs.from_folder(out)
    for field in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "moe_layers", "qkv_has_bias", "o_has_bias", "qk_norm", "rope_theta"):
        assert getattr(converted, field) == getattr(original, field), field
    assert converted.weight_shapes() == original.weight_shapes()
    got, want = load_file(str(out / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(got) == set(original.weight_shapes())
    for key in got:
        stack = re.sub(r"experts\.(\d+)\.", "experts.", key)
        if stack in stored and stored[stack].ndim == 3:  # one expert of a stack
            j = int(re.search(r"experts\.(\d+)\.", key)[1])
            np.testing.assert_array_equal(got[key], stored[stack][j], err_msg=key)
            if not quantized:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if not quantized:
        monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
        logits = backend_logits(Session(mlx_backend(path)), PROMPT, STEPS)
        assert np.abs(logits - references(name)[0]).max() < 1e-4


# ---- Qwen3's thinking switch: enable_thinking through the tokenizer, the CLI and the server -----------

QWEN25_TAIL = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
# Qwen3's generation tail: with thinking off, the template writes an empty <think> block for the model.
QWEN3_TAIL = ("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
              "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
              "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}\n")
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def thinking_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny Qwen3 with a chat template that has Qwen3's thinking switch."""
    folder = tmp_path_factory.mktemp("thinking") / "qwen3"
    shutil.copytree(tiny_model("qwen3-untied"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"].endswith(QWEN25_TAIL)
    config["chat_template"] = config["chat_template"].removesuffix(QWEN25_TAIL) + QWEN3_TAIL
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_template_kwargs_render_as_transformers(thinking_model):
    from transformers import AutoTokenizer

    from qwen_mlx.tokenizer import Tokenizer

    hf, ours = AutoTokenizer.from_pretrained(thinking_model), Tokenizer.from_folder(thinking_model)
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    assert ours.has_thinking_switch
    for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(chat, **kwargs) == want
    assert ours.apply_chat_template(chat, enable_thinking=False).endswith(EMPTY_THINK)
    ours.template_kwargs["enable_thinking"] = False  # what --no-think sets
    assert ours.encode_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False,
                                                             tokenize=True, return_dict=False)
    assert not ours.apply_chat_template(chat, enable_thinking=True).endswith(EMPTY_THINK)  # a call's own wins
    ours.template_kwargs["messages"] = []  # a request's chat_template_kwargs may hold anything
    with pytest.raises(QwenError, match="chat template variables messages cannot be overridden"):
        ours.apply_chat_template(chat)


def _generate(folder: Path, capsys, *flags: str) -> tuple[str, dict]:
    import cli

    assert cli.main(["generate", "--model", str(folder), "--prompt", "Hi", "--max-tokens", "2",
                     "--temperature", "0", *flags]) == 0
    err = capsys.readouterr().err
    return err, json.loads(err.strip().splitlines()[-1])


def test_cli_no_think(thinking_model, tiny_model, capsys):
    from qwen_mlx.tokenizer import Tokenizer

    think_tokens = len(Tokenizer.from_folder(thinking_model).encode(EMPTY_THINK))
    _, on = _generate(thinking_model, capsys)
    err, off = _generate(thinking_model, capsys, "--no-think")
    assert off["prompt_tokens"] == on["prompt_tokens"] + think_tokens and "no thinking switch" not in err
    err, _ = _generate(tiny_model("qwen3-untied"), capsys, "--no-think")  # Qwen2.5's template: says so
    assert "note: this model's chat template has no thinking switch" in err


def test_server_chat_template_kwargs(thinking_model):
    """The OpenAI-style server takes vLLM's `chat_template_kwargs`; `serve --no-think` sets the default."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from tests.support.server import Server

    def prompt_tokens(server, **extra) -> int:
        reply = server.client().chat.completions.create(
            model="qwen3", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0, **extra)
        return reply.usage.prompt_tokens

    server = Server(thinking_model, "--no-think")
    try:
        off = prompt_tokens(server)
        on = prompt_tokens(server, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        assert off > on
        assert prompt_tokens(server, extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == off
        with pytest.raises(Exception, match="cannot be overridden"):
            prompt_tokens(server, extra_body={"chat_template_kwargs": {"messages": []}})
    finally:
        assert server.stop() == 0


def test_server_reasoning_apart(thinking_model, tmp_path):
    """A reply that starts inside the block the prompt opened comes back as `reasoning_content`, streamed or
    not, equal to the raw completion of the same prompt; `include_reasoning: false` drops it; with thinking
    off the same model's reply is all content."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from qwen_mlx.tokenizer import Tokenizer
    from tests.support.server import Server
    from tests.support.thinking import QWEN35_TAIL

    folder = tmp_path / "qwen3"
    shutil.copytree(thinking_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].removesuffix(QWEN3_TAIL) + QWEN35_TAIL
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    tokenizer = Tokenizer.from_folder(folder)
    server = Server(folder)
    try:
        client = server.client()

        def raw(**kwargs) -> str:
            ids = tokenizer.encode_chat(chat, **kwargs)
            return client.completions.create(model="qwen3", prompt=ids, max_tokens=8, temperature=0).choices[0].text

        def reply(**extra):
            return client.chat.completions.create(model="qwen3", messages=chat, max_tokens=8, temperature=0,
                                                  **extra).choices[0].message

        thought = raw()
        assert "</think>" not in thought and thought.strip("\n")
        message = reply()
        assert (message.content, message.reasoning_content) == ("", thought.strip("\n"))
        stream = client.chat.completions.create(model="qwen3", messages=chat, max_tokens=8, temperature=0, stream=True)
        deltas = [c.choices[0].delta for c in stream if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thought.strip("\n")
        assert "".join(d.content or "" for d in deltas) == ""
        assert getattr(reply(extra_body={"include_reasoning": False}), "reasoning_content", None) is None
        off = reply(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert (off.content, getattr(off, "reasoning_content", None)) == (raw(enable_thinking=False), None)
    finally:
        assert server.stop() == 0
