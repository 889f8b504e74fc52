"""The multi-token-prediction (MTP) layer of Qwen3-Next, Qwen3.5 and Qwen3.6: a drafter the checkpoint carries.

Released checkpoints store it beside the model under `mtp.*`: `fc` [E, 2E], two zero-centred input norms, one
full-attention decoder layer (`layers.0`, dense or MoE as the model) and a final norm; the embedding and the LM
head are the model's. It predicts the token after next. For the pair (h_p, t_{p+1}), where h_p is the model's
hidden state at position p (after the model's final norm: what vLLM's Qwen3-Next MTP receives, and what the LM
head reads) and t_{p+1} the token that followed it:
    x = fc([norm_e(embed(t_{p+1})), norm_h(h_p)])     (embedding first, then hidden: vLLM's order)
    g = norm(layer(x))                                (the layer attends over its own KV cache of earlier pairs)
and lm_head(g) scores t_{p+2}. Drafting k tokens chains it: g takes the place of h for the next pair.
Which hidden state feeds it is where implementations differ: vLLM (qwen3_next_mtp.py, qwen3_5_mtp.py) passes the
model's output after its final norm and chains the layer's output after its own norm (as Megatron-LM's MTP layer
hands its normed output to the next depth), as here; llama.cpp's MTP graphs and mtplx pass states before the
norms. Only acceptance on a real checkpoint can tell (none was at hand): the choice changes drafts, never output.

The layer is a module of this family (qwen3_next.py's DecoderLayer, built as a full-attention layer), so its
forward is the model's own arithmetic; it is kept beside the model (`model.mtp`), not inside the decoder stack,
since the model never runs it. `MTPState` is one sequence's side of it: the model's hidden states not yet fed to
the layer (the backend adds every forward's, qwen_mlx/backends/mlx_batch.py) and the layer's KV cache.
Shapes: B batch, L positions, E hidden size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..errors import QwenError
from .cache import KVCache
from .layers import Linear
from .load import QUANT_GROUP_SIZE, quantize_model
from .qwen3_next import DecoderLayer, RMSNorm

MAX_PENDING = 4096  # hidden states kept per sequence for the layer: older ones are dropped (see MTPState.add)
CATCH_UP_CHUNK = 512  # positions per forward when the layer catches up over a long prompt


class MTPHead(nn.Module):
    """`mtp.*` with the checkpoint's names (the `mtp.` prefix stripped)."""

    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        E, eps = args.hidden_size, args.rms_norm_eps
        # One full-attention layer whose MLP is MoE exactly when the checkpoint stores experts for it.
        layer_args = dataclasses.replace(args, num_hidden_layers=1, layer_types=["full_attention"],
                                         mlp_only_layers=[] if moe else [0], decoder_sparse_step=1)
        self.fc = Linear(2 * E, E, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(E, eps)
        self.pre_fc_norm_hidden = RMSNorm(E, eps)
        self.layers = [DecoderLayer(layer_args, 0)]
        self.norm = RMSNorm(E, eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: KVCache) -> mx.array:
        """embeddings of t_{p+1} and hidden states h_p, B L E each, after the cache's pairs -> g B L E."""
        x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)],
                                   axis=-1))
        x = self.layers[0](x, "causal" if x.shape[1] > 1 else None, cache)
        return self.norm(x)


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """The model's output layer over hidden states B L E (after its final norm) -> logits B L V."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def forward_hidden(model: nn.Module, input_ids: mx.array, cache: list, mask: mx.array | str | None = None,
                   last_only: bool = True) -> tuple[mx.array, mx.array]:
    """The model's forward as `model(...)` gives it, and the hidden state of every position fed (B L E, after the
    final norm). The last layer runs for every position, not the last alone: the MTP layer needs them all."""
    h = model.model(input_ids, cache, mask)
    return lm_head(model, h[:, -1:] if last_only else h), h


class MTPState:
    """One sequence's MTP side: hidden states of the model not yet fed to the layer (absolute positions), the
    layer's KV cache, `fed` (the positions p whose pair (h_p, t_{p+1}) the layer has taken, or skipped) and `true`
    (the cache's pairs made of the model's own hidden states). Past `true` the cache may hold the previous
    proposal's chained pairs; they are cut before the next catch-up (MTPDrafter, qwen_mlx/engine/speculative.py).
    The layer's RoPE runs on its own count of pairs: where hidden states are missing (a prefix reused from the
    prefix cache, older ones dropped), the pairs it holds keep their distances to each other (RoPE is relative),
    and the layer simply sees less of the past. That changes drafts, never the output (the verifier decides)."""

    def __init__(self, start: int):
        self.cache = KVCache()
        self.fed = start
        self.true = 0
        self.pending: list[tuple[int, mx.array]] = []  # (position of the first, hidden states 1 L E)

    def add(self, position: int, hidden: mx.array) -> None:
        self.pending.append((position, hidden))
        n = sum(h.shape[1] for _, h in self.pending)
        while n > MAX_PENDING:  # a long prompt or a long pause: the layer sees the newest positions
            p, h = self.pending.pop(0)
            drop = min(h.shape[1], n - MAX_PENDING)
            if drop < h.shape[1]:
                self.pending.insert(0, (p + drop, h[:, drop:]))
            n -= drop

    def cut(self, length: int) -> None:
        """Forget what belongs to positions >= length: rejected drafts' hidden states; and where the sequence goes
        back before what the layer took (the one cache's next request, sharing less), the layer's cache too (its
        pairs cannot be told apart by position once some are missing)."""
        self.pending = [(p, h[:, :length - p]) for p, h in self.pending if p < length]
        if length < self.fed:
            self.cache, self.true, self.fed = KVCache(), 0, length

    def take(self) -> tuple[int, mx.array] | None:
        """The pending hidden states from the first one not fed yet, contiguous: (position, 1 L E), or None."""
        parts = [(p, h) for p, h in self.pending if p + h.shape[1] > self.fed]
        self.pending = []
        if not parts:
            return None
        start = max(parts[0][0], self.fed)
        parts[0] = (start, parts[0][1][:, start - parts[0][0]:])
        return start, mx.concatenate([h for _, h in parts], axis=1)


def mtp_weights_from_folder(folder: Path) -> dict[str, mx.array]:
    """Every `mtp.*` tensor in the folder's safetensors files."""
    weights: dict[str, mx.array] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            stored = mx.load(str(file))
        except (RuntimeError, ValueError) as e:
            raise QwenError(f"cannot read {file}: {e}") from None
        weights.update({k: v for k, v in stored.items() if k.startswith("mtp.")})
    return weights


def load_mtp(model: nn.Module, weights: dict[str, mx.array], where: str, quantize: int | None = None) -> MTPHead:
    """The MTP layer from its `mtp.*` weights (in the model's dtype; with `quantize`, the bits `--quantize` gave the
    model, quantized as the model's layers are), attached to `model` as `model.mtp`, where the backends look for it
    (they then keep each sequence's hidden states)."""
    args = model.args
    if not args.hybrid:
        raise QwenError(f"--mtp needs a Qwen3-Next / Qwen3.5 / Qwen3.6 checkpoint; {where} is {args.model_type}")
    if not weights:
        raise QwenError(f"--mtp: {where} carries no multi-token-prediction layer (no mtp.* weights; "
                        "mlx-lm conversions and GGUFs written with --no-mtp drop it)")
    depth = len({k.split(".")[2] for k in weights if k.startswith("mtp.layers.")})
    if depth > 1:  # the releases carry one; vLLM cycles several by draft step, which is not built here
        raise QwenError(f"--mtp: {where} has {depth} MTP layers; one (mtp.layers.0) is supported")
    if any(k.endswith((".scales", ".biases")) and "mtp." in k for k in weights):
        raise QwenError(f"--mtp: {where} stores its MTP layer quantized; only float MTP weights are read")
    weights = model.sanitize(weights)  # experts fused or one by one -> stacked, as the model's own
    moe = any(k.startswith("mtp.layers.0.mlp.experts.") for k in weights)
    head = MTPHead(args, moe)
    dtype = model.model.norm.weight.dtype
    try:
        head.load_weights([(k.removeprefix("mtp."), v.astype(dtype)) for k, v in weights.items()], strict=True)
    except ValueError as e:
        raise QwenError(f"--mtp: the mtp.* weights of {where} do not fit this model: {e}") from None
    if quantize:  # a draft costs one layer's read: the same bits as the model's keep it that cheap
        quantize_model(head, quantize, QUANT_GROUP_SIZE)
    mx.eval(head.parameters())
    model.mtp = head
    return head
