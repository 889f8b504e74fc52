"""AWQ and GPTQ checkpoints repacked exactly into MLX affine quantization (qwen_mlx.formats.affine's layout).

Both formats store b-bit codes q, per-group scales s and integer zero points z: w = s * (q - z). MLX stores
w = scales * q + biases per contiguous group of inputs, so scales = s and biases = -z * s. Both are kept in
float32: the product of an fp16 (or bf16) scale and an integer below 256 is exact there, and so is MLX's
scales * q + biases, which then equals s * (q - z) bit for bit. No code is re-rounded.

Stored layouts (int32 words, codes in the low bits first):
- GPTQ (AutoGPTQ, optimum, gptqmodel; `checkpoint_format`/`format` "gptq" or "gptq_v2"): qweight
  [in*b/32, out] packed along the input; qzeros [groups, out*b/32] packed along the output; scales
  [groups, out]; g_idx [in], the group of each input. "gptq" (v1, the default and what Qwen publishes)
  stores z - 1 per code, read back as (stored + 1) mod 2^b as AutoGPTQ and onnxruntime-genai do; "gptq_v2"
  stores z. A v1 asymmetric checkpoint with a zero point of 0 stored -1, which overflowed into its
  neighbours when packed: readers disagree on it (gptqmodel carries, AutoGPTQ masks), so it is refused.
- AWQ (AutoAWQ's GEMM layout, 4-bit): qweight [in, out/8] packed along the output in AutoAWQ's interleaved
  order (word slot i holds column AWQ_ORDER[i] of each 8); qzeros [groups, out/8] the same; scales
  [groups, out].
A group size MLX lacks (e.g. 256, or -1: one group per row) is held exactly by repeating each scale and
bias over MLX groups of 128/64/32. GPTQ's act-order (`desc_act`) g_idx puts a group's inputs anywhere in the
row; MLX groups are contiguous, so the inputs must be permuted, and with them the activations. That is free
only for a down_proj (dense, expert or shared expert), whose inputs are made by its gate_proj/up_proj: their
output rows are permuted to match. Anywhere else it is refused with the reason. Experts stored one by one are
stacked as mlx-lm's switch_mlp. Norms, embeddings and biases are copied as stored (AWQ folds its activation
scales into the RMSNorm weights; nothing here assumes unit norms).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QwenError
from ..files import file_lock
from .affine import COPIED_SKIPPED, mlx_lm_config_keys
from .safetensors import read_safetensors_header, safetensors_files

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: word slot i holds column AWQ_ORDER[i] of 8
AWQ_REVERSE = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column j sits in slot AWQ_REVERSE[j]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint format -> offset added to the stored zero point
MLX_GROUPS = (128, 64, 32)
PACKED = ("qweight", "qzeros", "scales", "g_idx")
REPACK_VERSION = 1  # bump when the repacked folder's content changes, so cached repacks are rebuilt


@dataclass(frozen=True)
class Scheme:
    method: str  # "awq" | "gptq"
    bits: int
    group_size: int  # -1: one group per row
    zero_offset: int  # added to the stored zero point (GPTQ v1: 1)
    sym: bool

    def describe(self) -> str:
        g = "per row" if self.group_size == -1 else f"group size {self.group_size}"
        fmt = {0: ", gptq_v2", 1: ", gptq v1 (zero - 1 stored)"}[self.zero_offset] if self.method == "gptq" else ""
        return f"{self.method.upper()} {self.bits}-bit, {g}{fmt}{', sym' if self.sym else ''}"


def read_scheme(config: dict[str, Any]) -> Scheme | None:
    """config.json's `quantization_config` for quant_method awq/gptq, checked; None for anything else."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("awq", "gptq"):
        return None
    method, bits, group = qc["quant_method"], qc.get("bits"), qc.get("group_size", 128)
    if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
        raise QwenError(f"quantization_config.group_size {group!r} is not a positive integer (or -1)")
    if method == "awq":
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if version != "gemm":
            raise QwenError(f"AWQ version {version!r} is not supported (only AutoAWQ's GEMM layout is)")
        if bits != 4:
            raise QwenError(f"AWQ bits {bits!r} is not supported (AutoAWQ's GEMM layout is 4-bit only)")
        if qc.get("zero_point", True) is not True:
            raise QwenError("AWQ zero_point false is not supported (the GEMM layout stores zero points)")
        return Scheme("awq", 4, group, 0, False)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in GPTQ_FORMATS or qc.get("is_marlin_format"):
        raise QwenError(f"GPTQ checkpoint format {fmt!r} is not supported (gptq and gptq_v2 are)")
    if bits not in (4, 8):
        raise QwenError(f"GPTQ bits {bits!r} is not supported (4 and 8 are)")
    if qc.get("dynamic"):
        raise QwenError("GPTQ per-module overrides (quantization_config.dynamic) are not supported")
    return Scheme("gptq", bits, group, GPTQ_FORMATS[fmt], bool(qc.get("sym", True)))


def folder_scheme(folder: Path) -> Scheme | None:
    """The folder's AWQ/GPTQ scheme, or None (no config.json, or not AWQ/GPTQ). Pure Python, cheap."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # prepare_model reports a corrupt config.json
    return read_scheme(config) if isinstance(config, dict) else None


# ---- one module ------------------------------------------------------------------------------------------

@dataclass
class Unpacked:
    codes: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # float32 [out, groups]
    zeros: np.ndarray  # float32 [out, groups], integers
    group_size: int  # inputs per stored group (the row length for -1)
    perm: np.ndarray | None  # input order that makes the groups contiguous (act order), None when they are


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> uint8 codes, 32/bits of them per word along `axis`, low bits first."""
    w = np.moveaxis(np.ascontiguousarray(words).view(np.uint32), axis, -1)
    codes = (w[..., None] >> np.arange(0, 32, bits, dtype=np.uint32)) & np.uint32((1 << bits) - 1)
    return np.moveaxis(codes.astype(np.uint8).reshape(*w.shape[:-1], -1), -1, axis)


def unpack_module(scheme: Scheme, name: str, t: dict[str, np.ndarray], shape: tuple[int, int]) -> Unpacked:
    """The stored tensors of module `name` (qweight, qzeros, scales, g_idx) -> codes, scales and zero points
    in [out, in] order, checked against each other and the config's (out, in)."""
    b, mask = scheme.bits, (1 << scheme.bits) - 1
    out, n_in = shape
    for key in ("qweight", "qzeros", "scales"):
        if key not in t:
            raise QwenError(f"{name}: {key} is missing ({scheme.method.upper()} stores qweight, qzeros and scales)")
    if t["qweight"].dtype != np.int32 or t["qzeros"].dtype != np.int32:
        raise QwenError(f"{name}: qweight/qzeros must be int32, got {t['qweight'].dtype}/{t['qzeros'].dtype}")
    group = n_in if scheme.group_size == -1 else scheme.group_size
    groups = -(-n_in // group)
    expected = {"scales": (groups, out), "qzeros": (groups, out * b // 32),
                "qweight": (n_in * b // 32, out) if scheme.method == "gptq" else (n_in, out * b // 32)}
    if "g_idx" in t:
        expected["g_idx"] = (n_in,)
    wrong = [f"{k} {list(t[k].shape)} (expected {list(s)})" for k, s in expected.items() if t[k].shape != s]
    if wrong:
        raise QwenError(f"{name}: tensors do not match config.json ({out}x{n_in}, {b}-bit, group size "
                        f"{scheme.group_size}): {', '.join(wrong)}")
    if scheme.method == "gptq":
        codes = unpack_words(t["qweight"], b, axis=0)  # [in, out]
        zeros = unpack_words(t["qzeros"], b, axis=1)  # [groups, out]
    else:
        codes = unpack_words(t["qweight"], b, axis=1).reshape(n_in, -1, 8)[..., AWQ_REVERSE].reshape(n_in, out)
        zeros = unpack_words(t["qzeros"], b, axis=1).reshape(groups, -1, 8)[..., AWQ_REVERSE].reshape(groups, out)
    if scheme.zero_offset:
        if not scheme.sym and (zeros == mask).any():
            raise QwenError(f"{name}: a zero point of 0 stored in GPTQ v1 format overflows into its neighbours "
                            "(readers disagree on it); re-save the checkpoint in gptq_v2 format")
        zeros = (zeros + scheme.zero_offset) & mask
    if scheme.sym and scheme.method == "gptq" and (zeros != 1 << (b - 1)).any():
        raise QwenError(f"{name}: config says sym, but zero points other than {1 << (b - 1)} are stored "
                        "(a gptq_v2 checkpoint labelled gptq, or the reverse?)")
    return Unpacked(codes.T, t["scales"].astype(np.float32).T, zeros.T.astype(np.float32), group,
                    _group_order(name, t.get("g_idx"), n_in, group, groups))


def _group_order(name: str, g_idx: np.ndarray | None, n_in: int, group: int, groups: int) -> np.ndarray | None:
    """None when g_idx is absent or the plain i // group_size; else the input order that makes each group
    contiguous, after checking g_idx is a grouping (each group holds group_size inputs)."""
    plain = np.arange(n_in) // group
    if g_idx is None or np.array_equal(g_idx, plain):
        return None
    g_idx = np.asarray(g_idx).astype(np.int64)
    if g_idx.min() < 0 or g_idx.max() >= groups or \
            not np.array_equal(np.bincount(g_idx, minlength=groups), np.bincount(plain, minlength=groups)):
        raise QwenError(f"{name}: g_idx is not a valid grouping of its {n_in} inputs into {groups} groups of "
                        f"{group} (each group id in 0..{groups - 1} must appear {group} times)")
    return np.argsort(g_idx, kind="stable")


def to_mlx(u: Unpacked, bits: int) -> tuple[dict[str, np.ndarray], int]:
    """Unpacked codes -> MLX's weight (uint32), scales and biases (float32), and the MLX group size: the
    largest of 128/64/32 that divides the stored groups, each stored scale and bias repeated over it."""
    codes, scales, zeros = u.codes, u.scales, u.zeros
    out, n_in = codes.shape
    if u.perm is not None:
        codes = codes[:, u.perm]
    mlx_group = next((g for g in MLX_GROUPS if u.group_size % g == 0 and n_in % g == 0), None)
    if mlx_group is None or n_in % u.group_size:
        raise QwenError(f"a group size of {u.group_size} over {n_in} inputs cannot be held in MLX's groups of "
                        f"{'/'.join(map(str, MLX_GROUPS))}")
    per = 32 // bits
    words = codes.astype(np.uint32).reshape(out, n_in // per, per) << (np.arange(per, dtype=np.uint32) * bits)
    repeat = u.group_size // mlx_group
    return {"weight": np.bitwise_or.reduce(words, axis=-1),
            "scales": np.repeat(scales, repeat, axis=1),
            "biases": np.repeat(-(zeros * scales), repeat, axis=1)}, mlx_group


def dequantize_reference(u: Unpacked) -> np.ndarray:
    """float32 [out, in] = s * (q - z), in the stored input order: what the MLX layer must hold."""
    g = np.arange(u.codes.shape[1]) // u.group_size
    if u.perm is not None:
        g = np.empty_like(g)
        g[u.perm] = np.arange(len(g)) // u.group_size
    return u.scales[:, g] * (u.codes.astype(np.float32) - u.zeros[:, g])


# ---- a whole folder --------------------------------------------------------------------------------------

def repack_folder(src: Path, out: Path, force: bool = False) -> Path:
    """Write `out`: an mlx_lm-layout quantized folder holding exactly the AWQ/GPTQ folder `src`'s weights."""
    import mlx.core as mx  # the I/O only: safetensors with bf16 tensors, which numpy cannot hold

    from ..config import ModelArgs
    from ..files import staged_folder

    src = Path(src)
    scheme = folder_scheme(src)
    if scheme is None:
        raise QwenError(f"{src}: config.json has no AWQ/GPTQ quantization_config")
    args = ModelArgs.from_folder(src)
    shapes = {k.removesuffix(".weight"): s for k, s in args.weight_shapes().items() if k.endswith(".weight")}
    files = safetensors_files(src)
    for f in files:
        read_safetensors_header(f)  # a truncated file is named before MLX reads it
    stored: dict[str, Any] = {}
    try:
        for f in files:
            stored.update(mx.load(str(f)))
    except (RuntimeError, ValueError) as e:
        raise QwenError(f"cannot read {src}: {e}") from None
    modules = sorted({k.rsplit(".", 1)[0] for k in stored if k.endswith((".qweight", ".qzeros"))})
    weights: dict[str, Any] = {k: v for k, v in stored.items()
                               if k.rsplit(".", 1)[0] not in modules or not k.endswith(PACKED)}
    overrides: dict[str, int] = {}
    perms: dict[str, np.ndarray] = {}
    for m in modules:
        if m not in shapes or len(shapes[m]) != 2:
            raise QwenError(f"{src}: {m} holds quantized tensors, but the model has no such linear layer")
        if m + ".weight" in stored:
            raise QwenError(f"{src}: {m} holds both a float weight and quantized tensors")
        # bfloat16 scales (numpy has no bfloat16) are widened first: exact
        t = {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
             for k in PACKED if (v := stored.get(f"{m}.{k}")) is not None}
        try:
            u = unpack_module(scheme, m, t, shapes[m])
            mlx, group = to_mlx(u, scheme.bits)
        except QwenError as e:
            raise QwenError(f"{src}: {e}" if str(e).startswith(m) else f"{src}: {m}: {e}") from None
        if u.perm is not None:
            if not m.endswith(".down_proj"):  # mlp, mlp.experts.<j>, mlp.shared_expert
                raise QwenError(f"{src}: {m}: act-order g_idx (desc_act) scatters each group over the row; MLX "
                                "groups are contiguous, so its inputs would have to be permuted, and this "
                                "layer's input cannot be permuted for free (only a down_proj's can, through "
                                "the rows of gate_proj and up_proj). Use a checkpoint quantized without "
                                "desc_act, or with static_groups")
            perms[m.removesuffix(".down_proj")] = u.perm
        weights.update({f"{m}.{k}": mx.array(v) for k, v in mlx.items()})
        overrides[m] = group
    if "lm_head" in overrides and args.tie_word_embeddings:
        raise QwenError(f"{src}: lm_head is quantized but config.json ties it to the float embedding")
    for mlp, perm in perms.items():  # down_proj's inputs reordered: so are the rows that produce them
        index = mx.array(perm.astype(np.int32))
        for proj in ("gate_proj", "up_proj"):
            if f"{mlp}.{proj}.weight" not in weights:
                raise QwenError(f"{src}: {mlp}.down_proj has an act-order g_idx but {mlp}.{proj} is missing")
            for key in [k for k in weights if k.startswith(f"{mlp}.{proj}.")]:
                weights[key] = weights[key][index]
    _stack_experts(weights, overrides, src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config")
    default = max(set(overrides.values()), key=list(overrides.values()).count) if overrides else 64
    quantization: dict[str, Any] = {"group_size": default, "bits": scheme.bits, "mode": "affine"}
    quantization.update({m: {"group_size": g, "bits": scheme.bits, "mode": "affine"}
                         for m, g in overrides.items() if g != default})
    config.update(mlx_lm_config_keys(args, config),
                  quantization=quantization, quantization_config=quantization, repacked_from=scheme.describe())
    with staged_folder(Path(out), force) as staging:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json", "quantize_config.json") \
                    and not f.name.endswith(COPIED_SKIPPED):
                shutil.copy2(f, staging / f.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    return Path(out)


def _stack_experts(weights: dict[str, Any], groups: dict[str, int], src: Path) -> None:
    """Experts stored one by one (`mlp.experts.<j>.<proj>`) -> mlx-lm's stacked `mlp.switch_mlp.<proj>`
    [X, out, ...], in place, which is how this project and mlx-lm hold quantized experts."""
    import re

    import mlx.core as mx

    stacks: dict[str, dict[int, str]] = {}
    for key in weights:
        if m := re.fullmatch(r"(.*\.mlp)\.experts\.(\d+)\.(\w+)\.(\w+)", key):
            stacks.setdefault(f"{m[1]}.switch_mlp.{m[3]}.{m[4]}", {})[int(m[2])] = key
    for target, members in stacks.items():
        module = target.rsplit(".", 1)[0]
        experts = [k.rsplit(".", 1)[0] for _, k in sorted(members.items())]
        if sorted(members) != list(range(len(members))) or len({groups.get(e) for e in experts}) != 1:
            raise QwenError(f"{src}: the experts of {module.replace('.switch_mlp.', '.experts.*.')} are not all "
                            "quantized alike (or some are missing)")
        weights[target] = mx.stack([weights.pop(k) for _, k in sorted(members.items())])
        if experts[0] in groups:
            groups[module] = groups[experts[0]]
    for key in [k for k in groups if ".mlp.experts." in k]:
        del groups[key]


def cached_repack(src: Path) -> Path:
    """repack_folder into cache_dir()/awq_gptq/<key>/ once; the key hashes the source's path, file sizes
    and modification times (not its bytes: a 7B checkpoint would take a minute to hash)."""
    from ..paths import cache_dir

    src = Path(src).resolve()
    stamp = [REPACK_VERSION, str(src)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                          for f in sorted(src.iterdir()) if f.is_file()]
    root = cache_dir() / "awq_gptq"
    target = root / hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    if (target / "config.json").is_file():  # appears by rename once complete
        return target
    with file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        return repack_folder(src, target, force=True)
