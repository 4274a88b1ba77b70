"""Llama decoder built from megatron-core tensor-parallel layers.

Math follows Hugging Face's LlamaForCausalLM so that export is a renaming of tensors:
RMSNorm in fp32 with eps inside the root, RoPE in the "rotate half" layout, grouped-query
attention where query head i reads key/value head i // (num_heads // num_kv_heads).

Tensor layout is [batch, sequence, hidden]. The model is a sequence of stages
(embedding, blocks, head) so that the pipeline path can cut it between blocks. Each block traces
into one torch.compile graph at any TP size (pretrain.model.execution): the tensor-parallel layers hand
their process group to megatron-core explicitly and all-reduce input gradients synchronously.

Sequence and context parallelism are switched on from outside (pretrain.model.parallelize): with
`sequence_parallel` the residual stream holds seq/tp of the tokens per TP rank (column-parallel
projections gather them, row-parallel ones reduce-scatter: pretrain.model.sequence_parallel);
with a `cp_group` each rank holds its chunks of the sequence and attention reads the keys and
values of all of them (pretrain.model.context_parallel).
"""

import math

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.args import ExecutionArgs, LlamaArgs, RopeScaling, RopeScalingKind
from pretrain.model.attention import attention
from pretrain.model.context_parallel import context_parallel_attention
from pretrain.model.loss import linear_cross_entropy
from pretrain.model.moe import MoE
from pretrain.model.sequence_parallel import (
    from_sequence_order, gathered_linear, reduce_grad, scatter_output, split_tokens, to_sequence_order,
)
from pretrain.model.weights import drop_empty_extra_state, initialize, mark_tensor_parallel


LOSS_PARTS = ("z_loss", "moe_aux_loss", "moe_z_loss")  # what the training loss adds to the cross-entropy


def megatron_layer_config(tp: int) -> ModelParallelConfig:
    """Layer settings that run on CPU and GPU alike; weights are filled by pretrain.model.weights."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def _no_init(_: torch.Tensor) -> None:
    """Placeholder init_method: weights are set after construction, by parameter name."""


class RowParallel(RowParallelLinear):
    """megatron-core's RowParallelLinear handing its own tp_group to the matmul: the stock forward
    passes None, and the fallback lookup of the group warns on rank 0, a torch.compile graph break."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return super()._forward_impl(input, weight, *args, **{**kwargs, "tp_group": self.tp_group})


def column_parallel(input_size: int, output_size: int, layer_config: ModelParallelConfig,
                    tp_group) -> ColumnParallelLinear:
    """A column-parallel projection of an input that the caller has passed through
    copy_to_tensor_model_parallel_region (megatron's own input-gradient all-reduce is asynchronous,
    which torch.compile cannot trace; one region also serves several projections of one input)."""
    return ColumnParallelLinear(input_size, output_size, config=layer_config, init_method=_no_init, bias=False,
                                gather_output=False, disable_grad_reduce=True, tp_group=tp_group)


def row_parallel(input_size: int, output_size: int, layer_config: ModelParallelConfig, tp_group) -> RowParallel:
    return RowParallel(input_size, output_size, config=layer_config, init_method=_no_init, bias=False,
                       input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.grad_reduce_group = None  # sequence parallel: the TP group, over which the weight's gradient is summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.grad_reduce_group is None else reduce_grad(self.weight, self.grad_reduce_group)
        return weight * x32.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and the factor cos/sin are scaled by, as Hugging Face computes them
    for rope_type default, llama3 and yarn."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling.kind == RopeScalingKind.llama3:
        original, factor = scaling.original_seq_len, scaling.factor
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < original / high) * ~(wavelength > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if scaling.kind == RopeScalingKind.yarn:
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(scaling.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        ramp = (torch.arange(head_dim // 2, dtype=torch.float) - low) / (high - low if high != low else 0.001)
        ramp = ramp.clamp(0, 1)
        frequencies = theta ** exponents
        extrapolated = 1 - ramp
        inv_freq = 1.0 / (scaling.factor * frequencies) * (1 - extrapolated) + 1.0 / frequencies * extrapolated
        return inv_freq, 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding, computed in fp32 like Hugging Face."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling):
        super().__init__()
        inv_freq, self.scale = rope_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention. The fused qkv projection is stored group-major: for each KV head
    g, the query heads it serves, then key g, then value g. A contiguous TP slice therefore holds
    whole groups, and the layout of the full tensor does not depend on TP. With `qk_norm` each
    query and key head is RMS-normalised (weights shared by the heads) before RoPE, as in Qwen3."""

    def __init__(self, args: LlamaArgs, layer_config: ModelParallelConfig, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = False  # x holds this TP rank's seq/tp tokens (set by pretrain.model.parallelize)
        self.cp_group = None  # context parallel: x holds this rank's chunks of the sequence
        self.recompute = False  # its block is recomputed in backward (set by pretrain.model.execution)
        self.head_dim = args.head_dim
        self.queries_per_group = args.num_heads // args.num_kv_heads
        self.local_groups = args.num_kv_heads // tp_group.size()
        qkv_size = (args.num_heads + 2 * args.num_kv_heads) * self.head_dim
        self.qkv_proj = column_parallel(args.hidden_size, qkv_size, layer_config, tp_group)
        self.o_proj = row_parallel(args.num_heads * self.head_dim, args.hidden_size, layer_config, tp_group)
        if args.qk_norm:  # one weight for all heads; a TP rank sees its heads only, so gradients sum over TP
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, args.norm_eps), RMSNorm(self.head_dim, args.norm_eps)
            if tp_group.size() > 1:
                self.q_norm.grad_reduce_group = self.k_norm.grad_reduce_group = tp_group
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sequence_parallel: bool = False):
        """q [batch, heads/tp, seq, head_dim], k and v [batch, kv_heads/tp, seq, head_dim], rotated."""
        if sequence_parallel:
            qkv = to_sequence_order(gathered_linear(x, (self.qkv_proj.weight,), self.tp_group)[0])
        else:
            qkv, _ = self.qkv_proj(copy_to_tensor_model_parallel_region(x, group=self.tp_group))
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.local_groups, self.queries_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.queries_per_group, 1, 1], dim=3)
        q, k = q.reshape(batch, seq, -1, self.head_dim), k.reshape(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(batch, seq, -1, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _output(self, out: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        if sequence_parallel:
            partial = F.linear(out, self.o_proj.weight)
            return scatter_output(from_sequence_order(partial, self.tp_group.size()), self.tp_group)
        out, _ = self.o_proj(out)
        return out

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """document_ids: [batch, seq] of the whole sequence, also under context parallelism."""
        q, k, v = self._project(x, cos, sin, self.sequence_parallel)
        if self.cp_group is not None:
            out = context_parallel_attention(q, k, v, self.cp_group, document_ids, self.recompute)
        else:
            out = attention(q, k, v, document_ids)
        return self._output(out, self.sequence_parallel)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               cache: "KVCache | None") -> torch.Tensor:
        """Inference: the new positions attend to the cached ones and themselves as `mask`
        ([batch, 1, new, cached + new], True = may attend) allows."""
        q, k, v = self._project(x, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        return self._output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


class KVCache:
    """One block's keys and values of the positions decoded so far: [batch, kv_heads/tp, capacity, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.keys = torch.empty(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions; returns the keys and values of every position so far."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end], self.values[:, :, self.length:end] = k, v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, layer_config: ModelParallelConfig, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = False  # set by pretrain.model.parallelize
        self.gate_proj = column_parallel(hidden_size, ffn_hidden_size, layer_config, tp_group)
        self.up_proj = column_parallel(hidden_size, ffn_hidden_size, layer_config, tp_group)
        self.down_proj = row_parallel(ffn_hidden_size, hidden_size, layer_config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return self.forward_whole(x)
        gate, up = gathered_linear(x, (self.gate_proj.weight, self.up_proj.weight), self.tp_group)
        return scatter_output(F.linear(F.silu(gate) * up, self.down_proj.weight), self.tp_group)

    def forward_whole(self, x: torch.Tensor) -> torch.Tensor:
        """x holds whole sequences on every TP rank (no sequence parallelism: decoding, or switched off)."""
        x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        gate, _ = self.gate_proj(x)
        up, _ = self.up_proj(x)
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


def build_mlp(args: LlamaArgs, layer: int, layer_config: ModelParallelConfig, tp_group,
              ep_group=None) -> SwiGLU | MoE:
    """Block `layer`'s MLP: dense, or a mixture of experts (model.moe; shared out over `ep_group`)."""
    moe = args.moe
    if not moe.is_moe_layer(layer):
        return SwiGLU(args.hidden_size, args.ffn_hidden_size, layer_config, tp_group)
    shared = SwiGLU(args.hidden_size, moe.shared_experts * moe.expert_ffn_hidden_size, layer_config, tp_group) \
        if moe.shared_experts else None
    return MoE(moe, args.hidden_size, shared, ep_group, tp_group, layer)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then h + mlp(norm(h)); `layer` is its index,
    `ep_group` the expert-parallel group of its experts (if any)."""

    def __init__(self, args: LlamaArgs, layer_config: ModelParallelConfig, tp_group, layer: int, ep_group=None):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.attention = Attention(args, layer_config, tp_group)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = build_mlp(args, layer, layer_config, tp_group, ep_group)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.recompute = False  # activation checkpointing: set by pretrain.model.execution

    def _forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                 document_ids: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self.rotary(position_ids, x.dtype)
        h = x + self.attention(self.attention_norm(x), cos, sin, document_ids)
        return h + self.mlp(self.mlp_norm(h))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, position_ids, document_ids, use_reentrant=False)
        return self._forward(x, position_ids, document_ids)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None) -> torch.Tensor:
        """Inference on new positions (pretrain.generate), with or without a cache; never compiled."""
        cos, sin = self.rotary(position_ids, x.dtype)
        h = x + self.attention.decode(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.mlp.forward_whole(self.mlp_norm(h))

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        attention = self.attention
        return KVCache(batch, attention.local_groups, capacity, attention.head_dim, dtype, device)


def vocab_embedding(args: LlamaArgs, layer_config: ModelParallelConfig, tp_group) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(args.padded_vocab_size(tp_group.size()), args.hidden_size, init_method=_no_init,
                                  config=layer_config, tp_group=tp_group)


def output_projection(args: LlamaArgs, layer_config: ModelParallelConfig, tp_group,
                      tied: bool) -> ColumnParallelLinear:
    """hidden -> vocab-parallel logits; with `tied` it owns no weight (the embedding's is passed in)."""
    return ColumnParallelLinear(
        args.hidden_size, args.padded_vocab_size(tp_group.size()), config=layer_config, init_method=_no_init,
        bias=False, gather_output=False, skip_weight_param_allocation=tied, tp_group=tp_group,
    )


class Llama(nn.Module):
    """Decoder-only Llama. forward(tokens) returns vocab-parallel logits [batch, seq, vocab/tp]:
    each TP rank holds its slice of the (padded) vocabulary. forward(tokens, labels=labels)
    returns the mean next-token loss instead (in training with model.z_loss, the z-loss included,
    and with a mixture of experts its router losses; these parts are kept in `last_loss_parts`),
    computed with the output head chunk by chunk (pretrain.model.loss) so that the logits of the
    whole batch never exist.
    (pretrain.model.pipeline cuts the same modules into pipeline stages.)"""

    def __init__(self, args: LlamaArgs, tp_group, ep_group=None):
        super().__init__()
        self.args = args
        self.tp_group = tp_group
        self.sequence_parallel = False  # set by pretrain.model.parallelize, like cp_group
        self.cp_group = None
        layer_config = megatron_layer_config(tp_group.size())
        self.embedding = vocab_embedding(args, layer_config, tp_group)
        self.layers = nn.ModuleList(Block(args, layer_config, tp_group, layer, ep_group)
                                    for layer in range(args.num_layers))
        self.final_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.output = output_projection(args, layer_config, tp_group, tied=args.tie_embeddings)
        self.loss_chunk_tokens = ExecutionArgs.loss_chunk_tokens  # set by pretrain.model.execution
        self.last_loss_parts = torch.zeros(len(LOSS_PARTS))  # of the last loss (detached), for the logs
        mark_tensor_parallel(self)
        drop_empty_extra_state(self)

    def init_weights(self, seed: int) -> None:
        """Seeded initial weights, identical for any TP size (see pretrain.model.weights)."""
        initialize(self, seed, self.args.init_std, self.args.num_layers, self.tp_group.rank(), self.tp_group.size())

    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary slice of the output head (the embedding's when tied)."""
        return self.embedding.weight if self.args.tie_embeddings else self.output.weight

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """document_ids (optional, [batch, seq]): attention stays within each document.
        labels (optional, [batch, seq], -100 = no loss): return the mean loss (reduction="sum": this
        rank's sum over its tokens) instead of logits.
        Under context parallelism tokens, labels and position_ids (global positions: required) are
        this rank's chunks (pretrain.model.context_parallel.shard_batch), document_ids the whole sequence's."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embedding(tokens)
        if self.sequence_parallel:
            x = split_tokens(x, self.tp_group)
        for block in self.layers:
            x = block(x, position_ids, document_ids)
        x = self.final_norm(x)
        if labels is not None:
            loss, z_loss = linear_cross_entropy(
                x, labels, self.output_weight(), self.args.vocab_size, self.tp_group, self.loss_chunk_tokens, reduction,
                self.sequence_parallel, self.cp_group, z_loss=self.args.z_loss)
            routers = [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]
            aux_loss = z_loss.new_zeros(())
            router_z_loss = z_loss.new_zeros(())
            if routers and torch.is_grad_enabled():
                aux_loss, router_z_loss = sum(r.aux_loss for r in routers), sum(r.z_loss for r in routers)
                loss = loss + aux_loss + router_z_loss
                for router in routers:
                    router.record_load()
            self.last_loss_parts = torch.stack([z_loss, aux_loss.detach(), router_z_loss.detach()])
            return loss
        if self.sequence_parallel:
            return to_sequence_order(gathered_linear(x, (self.output_weight(),), self.tp_group)[0])
        logits, _ = self.output(x, weight=self.output_weight() if self.args.tie_embeddings else None)
        return logits
