"""Loading a checked checkpoint (qwen_mlx/checkpoint.py) into its PyTorch twin: the twin of
qwen_mlx/models/load.py. Stored quantized weights are dequantized exactly (the twin runs float)."""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen_mlx.checkpoint import Checkpoint
from qwen_mlx.dtypes import check_dtype
from qwen_mlx.errors import QwenError
from qwen_mlx.formats.affine import dequantize, module_params
from qwen_mlx.progress import progress_bar

from ..onnx_format import DTYPES  # the dtypes the twin is traced in
from . import model_class


def load_model(ckpt: Checkpoint, dtype: str = "float32", device: str | torch.device = "cpu") -> nn.Module:
    """Build the twin from a checked Checkpoint: every tensor read with safetensors, cast, loaded strictly
    (shapes were validated by prepare_model, so a mismatch here is a bug, not bad input)."""
    from safetensors import safe_open

    torch_dtype = getattr(torch, check_dtype(dtype, DTYPES, "the torch/ONNX export"))
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        model = model_class(ckpt.args.model_type)(ckpt.args)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[object, list[str]] = {}
    for key, info in ckpt.tensors.items():
        by_file.setdefault(info.file, []).append(key)
    stored = {key: info.name or key for key, info in ckpt.tensors.items()}
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in progress_bar(keys, f"loading {file.name}", total=len(keys)):
                    state[key] = f.get_tensor(stored[key])
        except (OSError, RuntimeError, ValueError) as e:
            raise QwenError(f"cannot read {file}: {e}") from None
    if ckpt.quantization is not None:
        state = _dequantized(state, ckpt)
    state = {k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()}
    model.load_state_dict(model.sanitize(state), strict=True, assign=True)
    for module in model.modules():  # numpy-built tables (rope) live on the CPU: move them with the weights
        if hasattr(module, "_inv_freq"):
            module._inv_freq = module._inv_freq.to(device)
    return model.eval()


def _dequantized(state: dict[str, torch.Tensor], ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """An mlx-lm quantized folder's tensors as float32 HF keys: each packed weight dequantized exactly
    (scales * q + biases, qwen_mlx.formats.affine), mlx-lm's stacked `switch_mlp` experts split back per expert."""
    for scales_key in [k for k in state if k.endswith(".scales")]:
        module = scales_key.removesuffix(".scales")
        w = dequantize(state[module + ".weight"].numpy(), state.pop(scales_key).float().numpy(),
                       state.pop(module + ".biases").float().numpy(), module_params(ckpt.quantization, module))
        state[module + ".weight"] = torch.from_numpy(w)
    for key in [k for k in state if ".mlp.switch_mlp." in k]:
        prefix, proj = key.split(".switch_mlp.")
        for j, w in enumerate(state.pop(key).unbind(0)):
            state[f"{prefix}.experts.{j}.{proj}"] = w
    return state
