"""Causal attention, optionally kept inside each document of a packed sequence, without ever
building a [seq, seq] mask.

q: [batch, heads, seq, head_dim]; k, v: [batch, kv_heads, seq, head_dim] (grouped-query).
document_ids: [batch, seq], non-decreasing along the sequence (the loader numbers the documents
of a sample 1, 2, 3, ...). Document masking runs FlexAttention with a block mask on GPU. On CPU,
where FlexAttention has no backward (torch 2.13), queries are taken in chunks of `CPU_CHUNK`
rows, each with a [batch, 1, chunk, seq] mask that is rebuilt in backward rather than kept.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

FLEX_BLOCK = 128  # FlexAttention's tile: the block mask holds one entry per FLEX_BLOCK x FLEX_BLOCK tile
CPU_CHUNK = 256

# Uncompiled, flex_attention materialises the scores; compiled it is a fused kernel (also when
# called from inside a compiled block).
_flex_attention = torch.compile(flex_attention)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention; with document_ids, also within each document only."""
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.device.type == "cpu":
        return _chunked_document_attention(q, k, v, document_ids)
    return _flex_attention(q, k, v, block_mask=document_block_mask(document_ids), enable_gqa=True)


def document_block_mask(document_ids: torch.Tensor, block_size: int = FLEX_BLOCK) -> BlockMask:
    """The causal same-document BlockMask, from each tile's first and last document id (tensors
    of [batch, tiles, tiles], no host synchronisation). A tile is full when its queries and keys
    all lie in one document strictly before the diagonal, partial when some pair may attend."""
    seq = document_ids.shape[1]
    tiles = torch.arange(-(-seq // block_size), device=document_ids.device)
    starts = tiles * block_size
    first = document_ids[:, starts]
    last = document_ids[:, (starts + block_size).clamp(max=seq) - 1]
    whole = starts + block_size <= seq  # the padded last tile is never full
    below_diagonal = tiles[:, None] > tiles[None, :]
    some = (tiles[:, None] >= tiles[None, :]) & (last[:, None, :] >= first[:, :, None])
    one_document = (first == last) & whole
    full = (below_diagonal & one_document[:, :, None] & one_document[:, None, :]
            & (first[:, :, None] == first[:, None, :]))
    partial_count, partial_index = _tile_lists(some & ~full)
    full_count, full_index = _tile_lists(full)

    def same_document(b, h, q_index, kv_index):
        return (q_index >= kv_index) & (document_ids[b, q_index] == document_ids[b, kv_index])

    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=block_size,
                                    mask_mod=same_document, seq_lengths=(seq, seq))


def _tile_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, q tiles, kv tiles] booleans -> per query tile the count of selected kv tiles and
    their indices first, as BlockMask wants them ([batch, 1, ...] for the head dimension)."""
    selected = selected.to(torch.int32)
    counts = selected.sum(-1, dtype=torch.int32)
    indices = torch.argsort(selected, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), indices[:, None].contiguous()


def _chunked_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                document_ids: torch.Tensor) -> torch.Tensor:
    seq, outputs = q.shape[2], []
    for start in range(0, seq, CPU_CHUNK):
        end = min(start + CPU_CHUNK, seq)
        args = (q[:, :, start:end], k[:, :, :end], v[:, :, :end], document_ids[:, start:end], document_ids[:, :end])
        if torch.is_grad_enabled():
            outputs.append(checkpoint(_chunk_attention, *args, use_reentrant=False))  # the mask is not kept
        else:
            outputs.append(_chunk_attention(*args))
    return torch.cat(outputs, dim=2)


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_ids: torch.Tensor,
                     key_ids: torch.Tensor) -> torch.Tensor:
    """Queries at positions [end - chunk, end) against keys [0, end)."""
    rows = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
    columns = torch.arange(k.shape[2], device=q.device)
    mask = (query_ids[:, :, None] == key_ids[:, None, :]) & (rows[:, None] >= columns[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
