"""One model over the ranks of an `mx.distributed` group: tensor parallel or pipeline parallel.

Called on a loaded model whose weights are still lazy (qwen_mlx/models/load.py, `shard=`): each rank cuts
what it keeps before anything is evaluated. A pipeline rank never reads another rank's layers from disk; a
tensor rank reads each tensor whole (MLX loads a tensor whole) and keeps its slice. Either way its peak memory
is ~1/N of the model plus what is in flight.

Tensor parallel (`tensor`), per decoder layer, one all-reduce after attention and one after the MLP:
- attention: q (and Qwen3-Next's interleaved output gate), k and v split by heads (MLX's AllToShardedLinear),
  o_proj split by its input rows (ShardedToAllLinear, whose all_sum is the all-reduce). With fewer KV heads
  than ranks, each rank keeps the one KV head its query heads read.
- Gated DeltaNet: the key/value heads split, with their slices of the conv channels, z, b, a, dt_bias and
  A_log; out_proj row-split.
- MLP: gate/up column-split, down row-split. MoE: every expert's columns split (the router is kept whole on
  each rank, so routing is the same everywhere), the shared expert's too, one all_sum of the block's output.
- embedding and LM head split by vocabulary rows: each rank looks up its rows (others add zeros) and
  computes its logits, gathered whole on every rank. These two matrices are a third of a small model.
Pipeline parallel (`pipeline`, the CLI's default: qwen_mlx/backends/distributed.py says why): contiguous layers
per rank; hidden states go rank to rank (send/recv) and
the last rank's logits are broadcast. It needs no divisibility and one transfer per rank per step.
Caches follow: each rank's make_cache covers its layers, and KV caches take their width from the local heads.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..errors import QwenError
from . import qwen2, qwen3_next

MODES = ("tensor", "pipeline")


def shard_model(model: nn.Module, group: mx.distributed.Group, mode: str = "tensor") -> nn.Module:
    """`model` (lazy weights) as this rank's part of it; returns the module to run (the same or a wrapper)."""
    if mode not in MODES:
        raise QwenError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if group.size() == 1:
        return model
    if mode == "pipeline":
        return PipelineModel(model, group)
    check_tensor_parallel(model.args, group.size())
    try:
        _shard_tensor_parallel(model, group)
    except ValueError as e:  # a quantized matrix whose groups do not split evenly (shapes are known while lazy)
        raise QwenError(f"tensor parallelism cannot split this model's quantized matrices over {group.size()} "
                        f"ranks ({e}); use --parallel pipeline") from None
    return model


def check_tensor_parallel(args, n: int) -> None:
    """Refuse, before any weight is read, a model whose heads or columns do not split into `n` equal parts."""
    def need(count: int, what: str) -> None:
        if count % n:
            raise QwenError(f"tensor parallelism over {n} ranks needs {what} divisible by {n} (it is {count}); "
                            f"use --parallel pipeline")
    need(args.num_attention_heads, "the attention heads")
    if args.num_key_value_heads % n and n % args.num_key_value_heads:
        raise QwenError(f"{args.num_key_value_heads} KV heads neither split over nor divide {n} ranks; "
                        "use --parallel pipeline")
    need(args.vocab_size, "the vocabulary")
    if any(not args.is_moe_layer(i) for i in range(args.num_hidden_layers)):
        need(args.intermediate_size, "the MLP's intermediate size")
    if args.num_experts:
        need(args.moe_intermediate_size, "the experts' intermediate size")
        if args.shared_expert:
            need(args.shared_expert_intermediate_size, "the shared expert's intermediate size")
    if args.hybrid:
        need(args.linear_num_key_heads, "the linear-attention key heads")


def _shard_tensor_parallel(model: nn.Module, group: mx.distributed.Group) -> None:
    inner = model.model
    inner.embed_tokens = VocabSharded(inner.embed_tokens, group, lookup=True)
    if "lm_head" in model:
        model.lm_head = VocabSharded(model.lm_head, group, lookup=False)
    for layer in inner.layers:
        if isinstance(layer.get("self_attn"), (qwen2.Attention, qwen3_next.Attention)):
            _shard_attention(layer.self_attn, group)
        if isinstance(layer.get("linear_attn"), qwen3_next.GatedDeltaNet):
            _shard_delta_net(layer.linear_attn, group)
        if isinstance(layer.mlp, qwen2.SparseMoeBlock):
            layer.mlp = AllSum(_shard_moe(layer.mlp, group), group)
        else:
            _shard_mlp(layer.mlp, group)


def _shard_attention(attn: nn.Module, group: mx.distributed.Group) -> None:
    n, r = group.size(), group.rank()
    # q_proj's rows are per head (Qwen3-Next's output gate interleaved per head), so a contiguous split is by heads
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    if attn.n_kv_heads % n == 0:
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.n_kv_heads //= n
    else:  # fewer KV heads than ranks: rank r's query heads all read KV head r // (n / K)
        head = r // (n // attn.n_kv_heads)
        for name in ("k_proj", "v_proj"):
            _keep_rows(attn[name], head * attn.head_dim, (head + 1) * attn.head_dim)
        attn.n_kv_heads = 1
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= n


def _keep_rows(linear: nn.Module, start: int, stop: int) -> None:
    """A Linear (float or quantized: packed codes, scales and biases are all per output row) cut to rows
    start:stop of its output."""
    linear.update({k: mx.contiguous(v[start:stop]) for k, v in linear.parameters().items()})


def _shard_delta_net(net: nn.Module, group: mx.distributed.Group) -> None:
    """Split the key heads (and the value heads that each serves) over the ranks."""
    n = group.size()
    kd = net.Hk * net.Dk
    conv_parts = [kd, 2 * kd]  # the conv's channels are [q | k | v], each split by heads
    if net.packed:  # Qwen3-Next packs [q k v z] and [b a] per key head: a contiguous split is by key heads
        net.in_proj_qkvz = shard_linear(net.in_proj_qkvz, "all-to-sharded", group=group)
        net.in_proj_ba = shard_linear(net.in_proj_ba, "all-to-sharded", group=group)
    else:
        net.in_proj_qkv = shard_linear(net.in_proj_qkv, "all-to-sharded", segments=conv_parts, group=group)
        for name in ("in_proj_z", "in_proj_b", "in_proj_a"):
            net[name] = shard_linear(net[name], "all-to-sharded", group=group)
    shard_inplace(net.conv1d, lambda path, w: (0, conv_parts), group=group)
    net.update({name: _rows(net[name], group) for name in ("dt_bias", "A_log")})
    net.out_proj = shard_linear(net.out_proj, "sharded-to-all", group=group)
    net.Hk, net.Hv = net.Hk // n, net.Hv // n


def _rows(x: mx.array, group: mx.distributed.Group) -> mx.array:
    n, r = group.size(), group.rank()
    size = x.shape[0] // n
    return mx.contiguous(x[r * size:(r + 1) * size])


def _shard_mlp(mlp: nn.Module, group: mx.distributed.Group) -> None:
    mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
    mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def _shard_moe(block: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """Each expert's (and the shared expert's) columns split in place, no all-reduce inside: the block's
    output is then this rank's share, which AllSum adds up once. The router and the shared expert's gate stay
    whole, so every rank routes every token to the same experts."""
    experts = block.experts
    for name in ("gate_proj", "up_proj"):
        shard_inplace(experts[name], "all-to-sharded", group=group)  # X I E: split I
    shard_inplace(experts.down_proj, "sharded-to-all", group=group)  # X E I: split I
    if block.has_shared_expert:
        shared = block.shared_expert
        shard_inplace(shared.gate_proj, "all-to-sharded", group=group)
        shard_inplace(shared.up_proj, "all-to-sharded", group=group)
        shard_inplace(shared.down_proj, "sharded-to-all", group=group)
    return block


class AllSum(nn.Module):
    """A module whose output is one rank's share of the whole: the sum over the ranks."""

    def __init__(self, inner: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.inner(x), group=self.group)


class VocabSharded(nn.Module):
    """An embedding or LM head (float or quantized) keeping rows start:start+V/N of the vocabulary.

    A lookup takes the ids in this rank's rows (the others read zeros) and sums over the ranks: each id has
    one non-zero term, so the sum is exact. Logits are this rank's V/N columns, gathered whole on every rank:
    each logit is the same dot product as a single process's."""

    def __init__(self, inner: nn.Module, group: mx.distributed.Group, lookup: bool):
        super().__init__()
        self.lookup = lookup
        vocab = inner.weight.shape[0]
        self.rows = vocab // group.size()
        self.start = group.rank() * self.rows
        inner.update({k: mx.contiguous(v[self.start:self.start + self.rows]) for k, v in inner.parameters().items()})
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        if self.lookup:  # the embedding: x holds token ids
            local = x - self.start
            mine = (local >= 0) & (local < self.rows)
            h = self.inner(mx.where(mine, local, 0))
            return mx.distributed.all_sum(mx.where(mine[..., None], h, 0), group=self.group)
        return self._gather(self.inner(x))  # hidden states: the head

    def as_linear(self, h: mx.array) -> mx.array:
        return self._gather(self.inner.as_linear(h))

    def _gather(self, logits: mx.array) -> mx.array:
        """... V/N on each rank -> ... V: all_gather stacks the ranks on axis 0, moved back before V."""
        n = self.group.size()
        parts = mx.distributed.all_gather(logits[None], group=self.group)          # N ... V/N
        return mx.moveaxis(parts, 0, -2).reshape(*logits.shape[:-1], n * self.rows)


class Placeholder(nn.Module):
    """Stands where a part of the model lives on another rank: holds nothing, never called."""


class PipelineModel(nn.Module):
    """Rank r runs layers [a_r, b_r) of the model; rank 0 embeds, the last rank norms and projects, and its
    logits reach every rank. Layers are split as evenly as they divide, the remainder to the first ranks."""

    def __init__(self, model: nn.Module, group: mx.distributed.Group):
        super().__init__()
        n, r = group.size(), group.rank()
        inner, count = model.model, len(model.model.layers)
        if count < n:
            raise QwenError(f"pipeline parallelism needs at least one layer per rank: {count} layers, {n} ranks")
        sizes = [count // n + (i < count % n) for i in range(n)]
        start = sum(sizes[:r])
        self.first, self.last = r == 0, r == n - 1
        self.group, self.args = group, model.args
        self.tied = model.args.tie_word_embeddings
        inner.layers = inner.layers[start:start + sizes[r]]
        if not (self.first or (self.last and self.tied)):
            inner.embed_tokens = Placeholder()
        if "lm_head" in model and not self.last:
            model.lm_head = Placeholder()
        self.model = inner  # .layers and .norm, as the batch backend reads them
        if "lm_head" in model:
            self.lm_head = model.lm_head
        self._make_cache = model.make_cache  # over this rank's layers

    def make_cache(self, *args, **kwargs) -> list:
        return self._make_cache(*args, **kwargs)

    def __call__(self, input_ids: mx.array, cache: list, mask: mx.array | str | None = None,
                 last_only: bool = True) -> mx.array:
        B, L = input_ids.shape
        r = self.group.rank()
        dtype = self.model.norm.weight.dtype  # the activations' (a quantized embedding's weight is not)
        if mask is None and L > 1:
            mask = "causal"
        if self.first:
            h = self.model.embed_tokens(input_ids)                                    # B L E
        else:
            h = mx.distributed.recv((B, L, self.args.hidden_size), dtype, r - 1, group=self.group)
        layers = self.model.layers
        for i, (layer, c) in enumerate(zip(layers, cache)):
            h = layer(h, mask, c, last_only and self.last and i == len(layers) - 1)
        shape = (B, 1 if last_only else L, self.args.vocab_size)
        if self.last:
            h = self.model.norm(h)
            head = self.model.embed_tokens.as_linear if self.tied else self.lm_head
            logits = head(h).astype(mx.float32)
        else:  # hand on, then wait for the last rank's logits (the send ordered before the broadcast)
            sent = mx.distributed.send(h, r + 1, group=self.group)
            logits = mx.depends(mx.zeros(shape, mx.float32), sent)
        return mx.distributed.all_sum(logits, group=self.group)  # only the last rank adds non-zeros
