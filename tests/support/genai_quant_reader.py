"""An independent reader of AWQ/GPTQ folders: onnxruntime-genai's own quantized-model loader (the one its
model builder uses), run in the genai peer venv (benchmarks/peers/setup_peers.sh), never importing qwen_mlx.

    $QWEN_MLX_PEERS/genai/bin/python tests/support/genai_quant_reader.py OUT.npz FOLDER [FOLDER ...]

For each quantized module of each folder it saves genai's unpacked integer codes [in, out], zero points
[groups, out] (GPTQ's stored zero + 1 applied by genai), scales [groups, out] and its float16
dequantization [out, in], under keys "<i>/<module>.<what>" (i: the folder's position).
"""

import json
import sys

import numpy as np
from onnxruntime_genai.models.loaders.awq import AWQModel
from onnxruntime_genai.models.loaders.base import QuantizedTensorModule
from onnxruntime_genai.models.loaders.gptq import GPTQModel


def read(folder: str) -> dict[str, np.ndarray]:
    config = json.load(open(f"{folder}/config.json"))
    qc = config["quantization_config"]
    base = {"awq": AWQModel, "gptq": GPTQModel}[qc["quant_method"]]

    class Reader(base):
        def repack_quantized_tensors(self, clear_g_idx):
            pass  # keep the stored tensors: each step is called below, and its result saved

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    model = Reader(qc["quant_method"], input_path=folder, quant_attrs={"config": qc, "use_g_idx": True},
                   q_size=config["num_attention_heads"] * head_dim,
                   kv_size=config["num_key_value_heads"] * head_dim,
                   intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"])
    result = {}
    for layer in model.layers:
        for part in ("self_attn", "mlp"):
            for proj, m in vars(getattr(layer, part)).items():
                if not isinstance(m, QuantizedTensorModule) or m.qweight is None:
                    continue
                name = f"model.layers.{layer.layer_id}.{part}.{proj}"
                model.prepare_quantized_tensor(m)  # GPTQ: stored zero + 1, masked
                model.unpack_qzeros(m)
                model.unpack_qweight(m)
                result[f"{name}.codes"] = m.qweight.numpy()
                result[f"{name}.zeros"] = m.qzeros.numpy()
                result[f"{name}.scales"] = m.scales.float().numpy()
                model.dequant_weight(m)
                result[f"{name}.dequant"] = m.qweight.float().numpy()
    return result


if __name__ == "__main__":
    out, *folders = sys.argv[1:]
    np.savez(out, **{f"{i}/{k}": v for i, folder in enumerate(folders) for k, v in read(folder).items()})
