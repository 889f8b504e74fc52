"""GGUF block formats that are exactly MLX affine groups, repacked without rounding a single weight.

An MLX affine group holds w = scale * q + bias for G = 32 (or 64, 128) unsigned b-bit codes q. These llama.cpp
blocks are that form with G = 32 (the block, or a K-quant's 32-element sub-block):

    Q8_0   w = d * q8   (q8 signed)        -> bits 8, q = q8 + 128, scale d,      bias -128 d
    Q4_0   w = d * (q - 8)                 -> bits 4,              scale d,      bias -8 d
    Q4_1   w = d * q + m                   -> bits 4,              scale d,      bias m
    Q5_0   w = d * (q - 16)                -> bits 5,              scale d,      bias -16 d
    Q5_1   w = d * q + m                   -> bits 5,              scale d,      bias m
    Q4_K   w = d * sc_j * q - dmin * m_j   -> bits 4, per 32:      scale d sc_j, bias -dmin m_j
    Q5_K   (as Q4_K, 5-bit codes)          -> bits 5

d, m, dmin are float16 and sc_j, m_j 6-bit integers, so every scale and bias is exact in float32 (d * sc_j
needs 17 significant bits: float16 and bfloat16 cannot hold it), and so is scale * q (at most 19 bits). MLX
then computes scale * q + bias with one rounding, the same one `gguf.quants.dequantize` makes: the weights
are equal (a signed zero may come out +0.0 where gguf gives -0.0). Scales and biases are stored float32.

Q6_K (and Q2_K, Q3_K) scale 16-element sub-blocks; MLX's smallest group is 32, so those are dequantized
(to float32, exactly `gguf.quants.dequantize`'s values), as are the rarer formats (IQ*, TQ*).

Pure numpy: no MLX, no torch. Codes are packed as MLX does: one little-endian bit stream per row in uint32
words (so 5-bit codes straddle words), as `qwen_mlx.formats.affine.dequantize` reads it.
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 32
# GGMLQuantizationType value -> (name, bits, bytes per block, elements per block).
KEPT = {
    8: ("Q8_0", 8, 34, 32),
    2: ("Q4_0", 4, 18, 32),
    3: ("Q4_1", 4, 20, 32),
    6: ("Q5_0", 5, 22, 32),
    7: ("Q5_1", 5, 24, 32),
    12: ("Q4_K", 4, 144, 256),
    13: ("Q5_K", 5, 176, 256),
}


def kept_bits(qtype: int) -> int | None:
    """The MLX bits a GGUF tensor type is held at, or None when it must be dequantized."""
    return KEPT[int(qtype)][1] if int(qtype) in KEPT else None


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per block -> float32 [..., blocks, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins ([..., 8] each)."""
    lo, mid, hi = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def unpack(data: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw GGUF blocks [..., row bytes] (uint8) -> codes uint8 [..., n], scales and biases float32
    [..., n / 32], with w = scales * codes + biases per group of 32."""
    name, _, size, per_block = KEPT[int(qtype)]
    data = np.ascontiguousarray(data, dtype=np.uint8)
    *lead, row = data.shape
    b = data.reshape(*lead, row // size, size)  # [..., blocks, bytes]
    if name == "Q8_0":
        d = _f16(b[..., 0:2])
        codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, -128 * d
    elif name in ("Q4_0", "Q4_1"):
        d = _f16(b[..., 0:2])
        codes = _nibbles(b[..., size - 16:])
        scales, biases = d, (_f16(b[..., 2:4]) if name == "Q4_1" else -8 * d)
    elif name in ("Q5_0", "Q5_1"):
        d = _f16(b[..., 0:2])
        at = 4 if name == "Q5_1" else 2  # qh follows d (and m)
        qh = np.unpackbits(b[..., at:at + 4], axis=-1, bitorder="little")  # bit j is element j's fifth bit
        codes = _nibbles(b[..., at + 4:]) | (qh << 4)
        scales, biases = d, (_f16(b[..., 2:4]) if name == "Q5_1" else -16 * d)
    else:  # Q4_K / Q5_K: 256 = 8 sub-blocks of 32, each 64 codes' nibbles share 32 bytes
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., size - 128:].reshape(*lead, -1, 4, 1, 32)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, -1, 8, 32)
        if name == "Q5_K":  # qh[j] bit s is the fifth bit of element j of sub-block s
            qh = b[..., 16:48].reshape(*lead, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            codes = codes | ((qh & 1) << 4)
        scales, biases = d * sc, -(dmin * mn)  # [..., blocks, 8]
        codes = codes.reshape(*lead, -1, 256)
    n = row // size * per_block
    return codes.reshape(*lead, n), scales.reshape(*lead, n // GROUP_SIZE), biases.reshape(*lead, n // GROUP_SIZE)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> uint32 [..., n * bits / 32]: each row one little-endian stream of `bits`-bit
    codes, as `mx.quantize` lays them out."""
    *lead, n = codes.shape
    stream = np.unpackbits(codes[..., None], axis=-1, count=bits, bitorder="little").reshape(*lead, n * bits)
    return np.packbits(stream, axis=-1, bitorder="little").view("<u4")


def to_mlx(data: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Raw GGUF rows -> MLX (weight uint32, scales float32, biases float32), or None when this tensor's
    values cannot be held (a non-finite scale: let the dequantizer say what it is)."""
    codes, scales, biases = unpack(data, qtype)
    with np.errstate(over="ignore", invalid="ignore"):
        top = scales * np.float32((1 << kept_bits(qtype)) - 1) + biases
    if not (np.isfinite(top).all() and np.isfinite(biases).all()):
        return None
    return pack(codes, kept_bits(qtype)), scales, biases
