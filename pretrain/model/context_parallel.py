"""Context parallelism: each sequence is split over the cp ranks of a context-parallel group.

Load balance: the sequence is cut into 2 x cp chunks of c tokens and rank i holds chunks i and
2cp-1-i, so that every rank has the same causal attention work (an early chunk sees few keys, its
partner many). `shard_batch` hands each rank its tokens, labels and global positions; document
ids stay whole (every rank's queries may attend to keys of any chunk).

Attention of the local queries runs against the keys and values of the whole sequence,
all-gathered from the cp ranks (as in Llama 3's long-context training), and the gradients of the
gathered keys and values are reduce-scattered back. For backward only this rank's keys and values
are kept, gathered again when backward runs, so activation memory falls by cp. On CPU both
passes use aten's flash-attention kernel with an explicit mask, a block of query rows at a time
(the forward's log-sum-exp is kept: nothing is recomputed); on GPU the forward is FlexAttention
with a block mask and backward recomputes it (FlexAttention has no separate backward kernel)."""

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import create_block_mask

from pretrain.model.attention import _flex_attention
from pretrain.model.sequence_parallel import all_gather, reduce_scatter

QUERY_BLOCK = 512  # query rows per kernel call on CPU: bounds the explicit mask, [batch, 1, rows, keys]


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
    return {**batch, "tokens": tokens[:, index], "labels": batch["labels"][:, index], "position_ids": positions[:, index]}


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


def _row_blocks(seq_len: int, cp: int, rank: int) -> list[tuple[int, int, int]]:
    """(first local row, first global position, rows) of each block of local queries."""
    blocks, row = [], 0
    for start, end in chunk_spans(seq_len, cp, rank):
        for first in range(start, end, QUERY_BLOCK):
            blocks.append((row, first, min(QUERY_BLOCK, end - first)))
            row += blocks[-1][2]
    return blocks


def _block_mask(first: int, rows: int, document_ids: torch.Tensor | None, batch: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [batch, 1, rows, first + rows] of queries at global positions first.. against keys 0..:
    causal, and within the query's document."""
    keys = first + rows
    allowed = (torch.arange(keys, device=device)[None, :] <= torch.arange(first, keys, device=device)[:, None])
    allowed = allowed.expand(batch, rows, keys)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, first:keys, None] == document_ids[:, None, :keys])
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]


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


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.has_documents = group, document_ids is not None
        keys, values = _gather_sequence(torch.stack([k, v]), group)
        seq_len, cp, rank = keys.shape[2], group.size(), group.rank()
        if q.device.type == "cuda":
            block_mask = _flex_block_mask(seq_len, cp, rank, document_ids, q.shape[0], q.device)
            out = _flex_attention(q, keys, values, block_mask=block_mask, enable_gqa=True)
            ctx.block_mask = block_mask
            ctx.save_for_backward(q, k, v)
            return out
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        for row, first, rows in _row_blocks(seq_len, cp, rank):
            mask = _block_mask(first, rows, document_ids, q.shape[0], q.dtype, q.device)
            out[:, :, row:row + rows], lse[:, :, row:row + rows] = \
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[:, :, row:row + rows], keys[:, :, :first + rows], values[:, :, :first + rows], attn_mask=mask)
        ctx.save_for_backward(q, k, v, out, lse, *([document_ids] if document_ids is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *rest = ctx.saved_tensors
        group = ctx.group
        keys, values = _gather_sequence(torch.stack([k, v]), group)
        if q.device.type == "cuda":
            with torch.enable_grad():
                q_, keys, values = (t.detach().requires_grad_() for t in (q, keys, values))
                out = _flex_attention(q_, keys, values, block_mask=ctx.block_mask, enable_gqa=True)
                grad_q, grad_keys, grad_values = torch.autograd.grad(out, (q_, keys, values), grad_out)
        else:
            out, lse, *documents = rest
            document_ids = documents[0] if documents else None
            grad_q = torch.empty_like(q)
            grad_keys, grad_values = (torch.zeros_like(t, dtype=torch.float32) for t in (keys, values))
            for row, first, rows in _row_blocks(keys.shape[2], group.size(), group.rank()):
                mask = _block_mask(first, rows, document_ids, q.shape[0], q.dtype, q.device)
                block = slice(row, row + rows)
                grad_q[:, :, block], grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_out[:, :, block].contiguous(), q[:, :, block], keys[:, :, :first + rows],
                    values[:, :, :first + rows], out[:, :, block], lse[:, :, block], 0.0, False, attn_mask=mask)
                grad_keys[:, :, :first + rows] += grad_k
                grad_values[:, :, :first + rows] += grad_v
        grad_k, grad_v = _reduce_scatter_sequence(torch.stack([grad_keys, grad_values]).to(k.dtype), group)
        return grad_q, grad_k, grad_v, None, None


@torch.compiler.disable  # a graph break inside compiled blocks: the kernels and collectives run eagerly
def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                               document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of this rank's queries q [batch, heads, seq/cp, d] against the
    keys and values of the whole sequence (k, v [batch, kv_heads, seq/cp, d]: this rank's chunks);
    with document_ids [batch, seq] (the whole sequence's), also within each document only."""
    return _ContextParallelAttention.apply(q, k, v, document_ids, group)
