"""The hybrid family exported to ONNX (export/models/qwen3_next.py traced by export/onnx_export.py) against HF
transformers, on tiny checkpoints saved as the releases are (tests/support/hybrid_models.py), two layers each (one
linear, one full attention: every path of the graph, at half the trace time of the four-layer ones): the graph's
recurrent state named and shaped as transformers.js v4 reads it, logits of a prompt spanning several chunks and of
cached decode steps on our ONNX backend (one sequence and batched), greedy tokens, a prompt then decode steps
through the exported state == one pass, transformers.js in Node, and the dtype set. One float32 export per type
per session: the trace is most of this module's time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality.reference import backend_logits, reference_greedy, reference_logits
from qwen_mlx.backends.base import Session, greedy_tokens
from tests.support.cli import run
from tests.support.hybrid_models import HF_CLASSES, HYBRID_CONFIGS, write_hybrid_model

NAMES = list(HYBRID_CONFIGS)
RNG = np.random.default_rng(11)
PROMPT = RNG.integers(3, 500, size=150).tolist()  # 150 positions: several chunks of the graph's delta rule
STEPS = RNG.integers(3, 500, size=12).tolist()
# Two layers, linear then full attention; Qwen3-Next keeps a dense MLP layer among its MoE ones.
TWO_LAYERS = {"next-moe": dict(mlp_only_layers=[1]), "q35-tied": {}, "q35-moe": {}}


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory):
    """two_layer(name) -> a two-layer checkpoint of `name`'s config, built once per module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            folder = tmp_path_factory.mktemp(f"hybrid2-{name}")
            built[name] = write_hybrid_model(folder, name, num_hidden_layers=2, full_attention_interval=2,
                                             **TWO_LAYERS[name])
        return built[name]

    return get


# The files each type's export writes (None: the default set, fp32 fp16 q8 q4 q4f16), each checked by the exporter
# against the float32 twin (onnx_validate.TOLERANCE); all from one fp32 trace (and one fp16) per type.
DTYPES = {"next-moe": ["fp32"], "q35-tied": None, "q35-moe": ["fp32", "q4"]}


@pytest.fixture(scope="module")
def exported(two_layer, tmp_path_factory):
    """exported(name) -> (checkpoint folder, ONNX folder holding DTYPES[name], each file checked on export).
    The checkpoints with quantized files are `_calm` copies (see there)."""
    from export.onnx_export import default_variants, export_onnx_variants
    from qwen_mlx.checkpoint import prepare_model

    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            root = tmp_path_factory.mktemp(f"hybrid-onnx-{name}")
            folder = two_layer(name) if DTYPES[name] == ["fp32"] else _calm(two_layer(name), root / "calm")
            ckpt = prepare_model(str(folder))
            export_onnx_variants(ckpt, root / "export", DTYPES[name] or default_variants(ckpt)[0])
            built[name] = folder, root / "export"
        return built[name]

    return get


def _calm(src: Path, dst: Path) -> Path:
    """A copy of `src` with its projection weights halved. The fixtures' weights (drawn at 0.2, a gain of ~1.6 per
    projection at hidden size 64) make a chaotic network, in which any rounding grows through the recurrence: MLX's
    own 4-bit model scores ~10% greedy agreement on them. Halved, rounding stays rounding, and the exporter's own
    check tells a lossy file from a broken one (measured: fp16 2e-3, q8 0.07 / 89%, q4 0.48 / 56%)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        weights = load_file(str(file))
        save_file({k: v if k.endswith(("norm.weight", "A_log", "dt_bias")) else v * 0.5 for k, v in weights.items()},
                  str(file), metadata={"format": "pt"})
    return dst


def _reference(folder: Path):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(transformers, HF_CLASSES[config["model_type"]][1])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _onnx(folder: Path):
    from export.backends.onnx import OnnxBackend

    return OnnxBackend(folder)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_logits_and_greedy_equal_transformers(exported, name):
    folder, out = exported(name)
    ref = _reference(folder)
    want = reference_logits(ref, PROMPT, STEPS)
    got = backend_logits(Session(_onnx(out)), PROMPT, STEPS)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert greedy_tokens(Session(_onnx(out)), PROMPT[:40], 32) == reference_greedy(ref, PROMPT[:40], 32)


def test_the_state_is_named_and_shaped_as_transformers_js_reads_it(exported):
    """transformers.js v4 (configs.js getCacheNames) takes the layer kinds from config.json's `layer_types`
    (text_config's for qwen3_5) and zero-fills each past from the graph's input shapes, every symbolic axis but
    `batch_size` at 0: the window and state must have static shapes, keys and values a symbolic past length."""
    import onnx

    folder, out = exported("q35-tied")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["layer_types"] == ["linear_attention", "full_attention"]
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph

    def shapes(values) -> dict[str, list]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = shapes(graph.input), shapes(graph.output)
    a = HYBRID_CONFIGS["q35-tied"]
    Dv = a["linear_value_head_dim"]
    C = 2 * a["linear_num_key_heads"] * a["linear_key_head_dim"] + a["linear_num_value_heads"] * Dv
    assert inputs["past_conv.0"] == outputs["present_conv.0"] == ["batch_size", C, 3]
    assert inputs["past_recurrent.0"] == outputs["present_recurrent.0"] == \
        ["batch_size", a["linear_num_value_heads"], a["linear_key_head_dim"], Dv]
    assert inputs["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 32]
    assert outputs["present.1.value"] == ["batch_size", 2, "total_sequence_length", 32]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert not (out / "genai_config.json").exists()  # a keys-and-values genai config would describe another graph


@pytest.mark.parametrize("name", ["next-moe", "q35-moe"])
def test_prompt_then_decode_through_the_exported_state_equals_one_pass(exported, name):
    """The graph itself on onnxruntime: the prompt, then one token at a time with the presents fed back as the
    next pasts, gives the logits of the whole sequence in one run."""
    import onnxruntime as ort

    _, out = exported(name)
    backend = _onnx(out)
    session = ort.InferenceSession(str(backend.path), providers=["CPUExecutionProvider"])
    ids = np.array([PROMPT + STEPS], np.int64)
    T, P = ids.shape[1], len(PROMPT)

    def step(tokens: np.ndarray, start: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        L = tokens.shape[1]
        feed = {"input_ids": tokens, "attention_mask": np.ones((1, start + L), np.int64),
                "position_ids": np.arange(start, start + L, dtype=np.int64)[None],
                **dict(zip(backend.past_names, past))}
        logits, *presents = session.run(backend.outputs, feed)
        return logits[0], presents

    whole, _ = step(ids, 0, backend._empty_hybrid())
    logits, past = step(ids[:, :P], 0, backend._empty_hybrid())
    rows = [logits[-1]]
    for t in range(P, T - 1):
        logits, past = step(ids[:, t:t + 1], t, past)
        rows.append(logits[-1])
    want = whole[P - 1:T - 1]
    np.testing.assert_allclose(np.stack(rows), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_a_cut_reply_continued_on_onnx_equals_the_transcript_prefilled_fresh(exported):
    """The ONNX backend goes back to the mark at the end of the last prompt, as the torch and MLX ones do."""
    _, out = exported("next-moe")
    session = Session(_onnx(out))
    session.prefill(PROMPT[:60])
    for t in STEPS:
        session.step(t)
    turn2 = PROMPT[:60] + STEPS[:5] + PROMPT[100:130]
    got = session.prefill(turn2)
    assert session.prefilled == len(turn2) - 60
    want = Session(_onnx(out)).prefill(turn2)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()) and got.argmax() == want.argmax()


def test_gqa_attention_is_refused_in_one_line(two_layer, tmp_path):
    r = run("export-onnx", "--model", str(two_layer("q35-tied")), "--out", str(tmp_path / "x"), "--dtypes", "fp32",
            "--attention", "gqa")
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "--attention gqa" in r.stderr and not (tmp_path / "x").exists()


def test_engine_batches_onnx_rows_each_as_alone_and_reuses_prompts_whole(exported):
    """The server's engine on the exported graph: rows of different lengths decode together (each row's window
    and state stacked, keys and values left-padded) and each gets its greedy tokens alone; a later request
    starting with an earlier prompt prefills only what follows it (a recurrent state is reused whole)."""
    from export.backends.onnx_hybrid_batch import OnnxHybridBatch
    from qwen_mlx.backends import load
    from tests.support.engine import assert_hybrid_rows_batch_as_alone

    _, out = exported("q35-moe")
    loaded = load("onnx", str(out))
    assert_hybrid_rows_batch_as_alone(loaded, lambda: Session(_onnx(out)), OnnxHybridBatch, PROMPT, STEPS)


def test_transformers_js_in_node_runs_the_qwen3_next_folder(exported):
    """transformers.js v4 in Node loads the folder untouched (model.onnx, the state named as it names it, zero
    pasts sized from the graph's input shapes) and decodes our ONNX backend's greedy tokens. Its qwen3_5 types take
    its vision-language path (onnx/embed_tokens.onnx and a decoder on embeddings), which this export does not write."""
    from benchmarks.peers import edge_runtimes as er
    from tests.support.needs import needs_peer

    needs_peer("transformersjs")
    _, out = exported("next-moe")
    ids = [PROMPT[:30], PROMPT[60:75]]
    ours = er.run_runtime("ours", out, ids, 16)
    theirs = er.run_runtime("transformersjs", out, ids, 16, timeout=600)
    assert ours.ok and theirs.ok, (ours.error or "") + (theirs.error or "")
    assert er.compare(ours, theirs) == "yes", er.compare(ours, theirs)



@pytest.mark.parametrize("name", ["q35-tied", "q35-moe"])
def test_every_dtype_is_written_checked_and_runs(exported, name):
    """The default set of a dense model (fp32, fp16, q8, q4, q4f16) and int4 of a MoE one (its experts as
    com.microsoft QMoE): each file passed the exporter's check against the float32 twin, loads on our backend and
    is listed in config.json's transformers.js_config."""
    from export.backends.onnx import OnnxBackend
    from export.onnx_format import VARIANT_FILES

    _, out = exported(name)
    want = {"q35-tied": ["fp32", "fp16", "q8", "q4", "q4f16"], "q35-moe": ["fp32", "q4"]}[name]
    assert sorted(p.name for p in (out / "onnx").glob("*.onnx")) == sorted(VARIANT_FILES[v] for v in want)
    config = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert config.get("dtype", "fp32") in want
    for v in want:
        assert Session(OnnxBackend(out, variant=v)).prefill(PROMPT[:20]).shape == (512,)
