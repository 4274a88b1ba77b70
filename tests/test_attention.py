"""Document-masked attention without a [seq, seq] mask: equal to the dense-mask path, and what it
allocates (every CPU allocation, inductor's buffers included, seen through the profiler)."""

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.nn.attention.flex_attention import create_block_mask

from pretrain.model.attention import _flex_attention, attention, document_block_mask


def dense_document_attention(q, k, v, document_ids):
    """The reference: SDPA with the dense [batch, 1, seq, seq] causal same-document mask."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def random_inputs(batch: int, seq: int, documents_per_token: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    document_ids = (torch.rand(batch, seq, generator=generator) < documents_per_token).long().cumsum(1)
    q, k, v = (torch.randn(batch, heads, seq, 16, generator=generator) for heads in (4, 2, 2))
    return q, k, v, document_ids


def output_and_grads(function, q, k, v) -> list[torch.Tensor]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = function(q, k, v)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)).sum().backward()
    return [out, q.grad, k.grad, v.grad]


def allocation_sizes(function) -> list[int]:
    """Bytes of every CPU allocation made while `function()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    sizes, nodes = [], list(profile.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu" and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
    return sizes


@pytest.mark.parametrize("batch, seq", [(3, 200), (2, 600)])
def test_document_attention_equals_the_dense_mask_path(batch, seq):
    q, k, v, document_ids = random_inputs(batch, seq, documents_per_token=1 / 40)
    got = output_and_grads(lambda q, k, v: attention(q, k, v, document_ids), q, k, v)
    expected = output_and_grads(lambda q, k, v: dense_document_attention(q, k, v, document_ids), q, k, v)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-5


def test_document_attention_allocates_no_seq_by_seq_tensor_at_seq_4096():
    seq = 4096
    q, k, v, document_ids = random_inputs(1, seq, documents_per_token=1 / 300)
    got, expected = [], []
    sizes = allocation_sizes(lambda: got.extend(output_and_grads(
        lambda q, k, v: attention(q, k, v, document_ids), q, k, v)))
    dense_sizes = allocation_sizes(lambda: expected.extend(output_and_grads(
        lambda q, k, v: dense_document_attention(q, k, v, document_ids), q, k, v)))
    print(f"largest allocation: {max(sizes) / 2**20:.1f} MiB, dense-mask path {max(dense_sizes) / 2**20:.1f} MiB")
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-5
    assert max(dense_sizes) >= seq * seq  # the check sees a seq x seq boolean mask
    assert max(sizes) < seq * seq


def test_gpu_block_mask_equals_flex_attentions_own_and_gives_the_dense_result():
    """The GPU path (FlexAttention) checked on CPU where it runs, forward only: our block mask
    equals create_block_mask's (documents of 1 token up to longer than a tile, a ragged last tile)."""
    q, k, v, document_ids = random_inputs(2, 328, documents_per_token=1 / 60, seed=3)
    document_ids[1, 100:] += 1  # a document boundary on a tile edge ...
    document_ids[1, 7:9] += torch.tensor([1, 2])  # ... and one-token documents

    def same_document(b, h, q_index, kv_index):
        return (q_index >= kv_index) & (document_ids[b, q_index] == document_ids[b, kv_index])

    ours = document_block_mask(document_ids, block_size=64)
    reference = create_block_mask(same_document, 2, None, 328, 328, device="cpu", BLOCK_SIZE=64)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(reference, name))
    with torch.no_grad():
        out = _flex_attention(q, k, v, block_mask=document_block_mask(document_ids), enable_gqa=True)
        assert (out - dense_document_attention(q, k, v, document_ids)).abs().max() < 1e-5
