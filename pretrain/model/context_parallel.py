"""Context parallelism: each sequence is split over the cp ranks of a context-parallel group.

Load balance: the sequence is cut into 2 x cp chunks of c tokens and rank i holds chunks i and
2cp-1-i, so that every rank has the same causal attention work (an early chunk sees few keys, its
partner many). `shard_batch` hands each rank its tokens, labels and global positions; document
ids stay whole (every rank's queries may attend to keys of any chunk).

Attention of the local queries runs against the keys and values of the whole sequence,
all-gathered from the cp ranks (as in Llama 3's long-context training; document masks need
nothing more), and the gradients of the gathered keys and values are reduce-scattered back. The
attention kernel runs once forward and once backward (FlexAttention with a block mask on GPU; on
CPU aten's flash-attention kernel and its backward a block of queries at a time, with an explicit
mask rebuilt per block); what it saves for backward is kept, except the gathered keys and values:
their memory is released after the forward and refilled before the backward by gathering this
rank's keys and values again, so activation memory falls by cp. Inside an activation-checkpointed
block, which keeps nothing anyway, plain autograd does (gather, attention; the recomputation
gathers again).
"""

from functools import partial

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import create_block_mask

from pretrain.model.attention import _flex_attention
from pretrain.model.sequence_parallel import all_gather, exchange, reduce_scatter

QUERY_BLOCK = 512  # query rows per CPU kernel call: bounds the explicit mask, [batch, 1, rows, keys]


def chunk_spans(seq_len: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """The global [start, end) of the two chunks `rank` holds, in the order it holds them."""
    c = seq_len // (2 * cp)
    return [(rank * c, (rank + 1) * c), ((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]


def chunk_positions(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions of the tokens `rank` holds, [seq_len / cp]."""
    return torch.cat([torch.arange(start, end, device=device) for start, end in chunk_spans(seq_len, cp, rank)])


def shard_batch(batch: dict, cp: int, rank: int) -> dict:
    """This context-parallel rank's part of a micro-batch: its chunks of tokens, labels and positions
    (global positions when the batch has none); document ids of the whole sequence. Other entries pass."""
    tokens = batch["tokens"]
    seq_len = tokens.shape[1]
    index = chunk_positions(seq_len, cp, rank)
    positions = batch.get("position_ids", torch.arange(seq_len).expand_as(tokens))
    return {**batch, "tokens": tokens[:, index], "labels": batch["labels"][:, index],
            "position_ids": positions[:, index]}


def _gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's chunks of x [..., seq/cp, d] -> [..., seq, d] in sequence order."""
    cp = group.size()
    gathered = all_gather(x, group)
    *lead, local, dim = x.shape
    c = local // 2
    out = x.new_empty((*lead, local * cp, dim))
    for rank in range(cp):
        for half, (start, end) in enumerate(chunk_spans(local * cp, cp, rank)):
            out[..., start:end, :] = gathered[rank, ..., half * c:(half + 1) * c, :]
    return out


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of _gather_sequence for gradients: [..., seq, d] -> this rank's chunks, summed over ranks."""
    cp = group.size()
    *lead, seq, dim = x.shape
    c = seq // (2 * cp)
    parts = x.new_empty((cp, *lead, 2 * c, dim))
    for rank in range(cp):
        for half, (start, end) in enumerate(chunk_spans(seq, cp, rank)):
            parts[rank, ..., half * c:(half + 1) * c, :] = x[..., start:end, :]
    return reduce_scatter(parts, group)


def _query_blocks(seq_len: int, cp: int, rank: int) -> list[tuple[int, int, int]]:
    """(first local row, its global position, rows) of each block of this rank's queries."""
    blocks, row = [], 0
    for start, end in chunk_spans(seq_len, cp, rank):
        for first in range(start, end, QUERY_BLOCK):
            blocks.append((row, first, min(QUERY_BLOCK, end - first)))
            row += blocks[-1][2]
    return blocks


def _block_mask(first: int, rows: int, document_ids: torch.Tensor | None, batch: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Additive mask [batch, 1, rows, first + rows] of the queries at global positions first.. against
    the keys before them: causal, and within the query's document."""
    end = first + rows
    allowed = (torch.arange(end, device=device)[None, :] <= torch.arange(first, end, device=device)[:, None])
    allowed = allowed.expand(batch, rows, end)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, first:end, None] == document_ids[:, None, :end])
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]


class _BlockwiseAttention(torch.autograd.Function):
    """CPU: aten's flash-attention kernel and its backward, QUERY_BLOCK query rows at a time against the
    keys up to the block's last position, each with an explicit mask that is rebuilt rather than kept."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, document_ids: torch.Tensor | None,
                cp: int, rank: int) -> torch.Tensor:
        ctx.blocks = _query_blocks(keys.shape[2], cp, rank)
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        for row, first, rows in ctx.blocks:
            mask = _block_mask(first, rows, document_ids, q.shape[0], q.dtype, q.device)
            out[:, :, row:row + rows], lse[:, :, row:row + rows] = \
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[:, :, row:row + rows], keys[:, :, :first + rows], values[:, :, :first + rows], attn_mask=mask)
        ctx.has_documents = document_ids is not None
        ctx.save_for_backward(q, keys, values, out, lse, *([document_ids] if ctx.has_documents else []))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, keys, values, out, lse, *documents = ctx.saved_tensors
        document_ids = documents[0] if ctx.has_documents else None
        grad_q = torch.empty_like(q)
        grad_keys, grad_values = (torch.zeros_like(t, dtype=torch.float32) for t in (keys, values))
        for row, first, rows in ctx.blocks:
            mask = _block_mask(first, rows, document_ids, q.shape[0], q.dtype, q.device)
            block = slice(row, row + rows)
            grad_q[:, :, block], grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, :, block].contiguous(), q[:, :, block], keys[:, :, :first + rows],
                values[:, :, :first + rows], out[:, :, block], lse[:, :, block], 0.0, False, attn_mask=mask)
            grad_keys[:, :, :first + rows] += grad_k
            grad_values[:, :, :first + rows] += grad_v
        return grad_q, grad_keys.to(keys.dtype), grad_values.to(values.dtype), None, None, None


def _flex_block_mask(seq_len: int, cp: int, rank: int, document_ids: torch.Tensor | None, batch: int,
                     device: torch.device):
    positions = chunk_positions(seq_len, cp, rank, device)

    def causal(b, h, q_index, kv_index):
        return kv_index <= positions[q_index]

    def same_document(b, h, q_index, kv_index):
        query = positions[q_index]
        return (kv_index <= query) & (document_ids[b, query] == document_ids[b, kv_index])

    mask_mod = causal if document_ids is None else same_document
    return create_block_mask(mask_mod, batch if document_ids is not None else None, None, len(positions), seq_len,
                             device=device, _compile=True)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: dist.ProcessGroup,
            document_ids: torch.Tensor | None) -> torch.Tensor:
    """The attention kernel (differentiable) on this rank's queries and the whole sequence's keys and values."""
    seq_len, cp, rank = keys.shape[2], group.size(), group.rank()
    if q.device.type == "cuda":
        block_mask = _flex_block_mask(seq_len, cp, rank, document_ids, q.shape[0], q.device)
        return _flex_attention(q, keys, values, block_mask=block_mask, enable_gqa=True)
    return _BlockwiseAttention.apply(q, keys, values, document_ids, cp, rank)


def _release(tensor: torch.Tensor) -> int:
    """Free a tensor's memory, keeping the tensor (autograd's saved references to it stay valid
    once refilled); returns its size."""
    size = tensor.untyped_storage().nbytes()
    tensor.untyped_storage().resize_(0)
    return size


def _refill(tensor: torch.Tensor, size: int, value: torch.Tensor) -> None:
    """Give a released tensor its memory back, holding `value`."""
    tensor.untyped_storage().resize_(size)
    tensor.data.copy_(value)  # .data: no version bump, autograd keeps treating it as the saved tensor


class _ContextParallelAttention(torch.autograd.Function):
    """The attention of this rank's queries, its graph kept inside (ctx) with the gathered keys and
    values released until backward refills them."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.q, ctx.kv = q.detach().requires_grad_(), _gather_sequence(torch.stack([k, v]), group).requires_grad_()
        with torch.enable_grad():
            ctx.out = _attend(ctx.q, ctx.kv[0], ctx.kv[1], group, document_ids)
        ctx.kv_size = _release(ctx.kv)
        ctx.save_for_backward(k, v)  # this rank's keys and values, which the gathered ones are rebuilt from
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        k, v = ctx.saved_tensors
        _refill(ctx.kv, ctx.kv_size, _gather_sequence(torch.stack([k, v]), ctx.group))
        grad_q, grad_kv = torch.autograd.grad(ctx.out, (ctx.q, ctx.kv), grad_out)
        del ctx.q, ctx.kv, ctx.out
        grad_k, grad_v = _reduce_scatter_sequence(grad_kv, ctx.group)
        return grad_q, grad_k, grad_v, None, None


@torch.compiler.disable  # a graph break inside compiled blocks: the kernel and the collectives run eagerly
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                               document_ids: torch.Tensor | None = None, recomputed: bool = False) -> torch.Tensor:
    """Causal grouped-query attention of this rank's queries q [batch, heads, seq/cp, d] against the
    keys and values of the whole sequence (k, v [batch, kv_heads, seq/cp, d]: this rank's chunks);
    with document_ids [batch, seq] (the whole sequence's), also within each document only.
    `recomputed`: the caller is an activation-checkpointed block."""
    if recomputed or not torch.is_grad_enabled():
        keys, values = exchange(torch.stack([k, v]), partial(_gather_sequence, group=group),
                                partial(_reduce_scatter_sequence, group=group))
        return _attend(q, keys, values, group, document_ids)
    return _ContextParallelAttention.apply(q, k, v, document_ids, group)
