"""Sequence parallelism: outside the tensor-parallel layers (norms, residual adds, the embedding's
output, the head's input) each TP rank holds seq/tp of the tokens, [batch, seq/tp, hidden].

A column-parallel projection all-gathers its input from the TP ranks and a row-parallel one
reduce-scatters its output (instead of all-reducing it). Gathered tokens are in "gathered order",
[tp, batch, seq/tp, ...] (rank r's tokens at index r): projections and the MLP do not care about
token order, attention does (`to_sequence_order`, `from_sequence_order`; free at micro-batch 1).

`gathered_linear` keeps only this rank's input shard for backward and gathers it again there for
the weight gradient, so activation memory falls by tp; its input gradient is reduce-scattered.
megatron-core has this path too, sequence-first and CUDA-only (it allocates on
torch.cuda.current_device()); these functions are device-neutral, and torch.compile traces them.
The replicated norm weights get their gradient summed over TP inside autograd (`reduce_grad`)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[*shape] on each rank -> [ranks, *shape]."""
    out = x.new_empty((group.size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out.view(group.size(), *x.shape)


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[ranks, *shape] on each rank -> [*shape], this rank's index summed over the ranks."""
    out = x.new_empty(x.shape[1:])
    dist.reduce_scatter_tensor(out, x.contiguous().flatten(0, 1), group=group)
    return out


class _GatheredLinear(torch.autograd.Function):
    """x [b, s/tp, h] -> x_all @ w.T for each weight, x_all [tp, b, s/tp, h] gathered from the TP ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        ctx.save_for_backward(x, *weights)
        gathered = all_gather(x, group)
        return tuple(gathered @ weight.t() for weight in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        gathered = all_gather(x, ctx.group).flatten(0, -2)
        grad_input = sum(grad @ weight for grad, weight in zip(grads, weights))
        grad_weights = [grad.flatten(0, -2).t() @ gathered for grad in grads]
        return reduce_scatter(grad_input, ctx.group), None, *grad_weights


class _Exchange(torch.autograd.Function):
    """A collective and its transpose: forward(x) going forward, backward(gradient) coming back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: Callable, backward: Callable) -> torch.Tensor:
        ctx.backward_exchange = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_exchange(grad), None, None


def exchange(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
             backward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """forward(x), differentiable: its gradient is backward(the output's gradient)."""
    return _Exchange.apply(x, forward, backward)


def _own_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return from_sequence_order(x, group.size())[group.rank()].contiguous()


def _all_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return to_sequence_order(all_gather(x, group))


def gathered_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...],
                    group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Column-parallel projections of this rank's tokens x [b, s/tp, h] gathered from the TP ranks:
    one [tp, b, s/tp, out/tp] output per weight [out/tp, h]; one gather serves every weight."""
    return _GatheredLinear.apply(x, group, *weights)


def scatter_output(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A row-parallel projection's partial output [tp, b, s/tp, h] -> this rank's tokens, summed over TP."""
    return exchange(x, partial(reduce_scatter, group=group), partial(all_gather, group=group))


def split_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Tokens the TP ranks all hold [b, s, h] -> this rank's share [b, s/tp, h]."""
    return exchange(x, partial(_own_tokens, group=group), partial(_all_tokens, group=group))


def reduce_grad(weight: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`weight` as it is, its gradient summed over the group (each rank saw other tokens)."""
    return copy_to_tensor_model_parallel_region(weight, group=group)


def to_sequence_order(x: torch.Tensor) -> torch.Tensor:
    """[tp, b, s/tp, ...] -> [b, s, ...]."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def from_sequence_order(x: torch.Tensor, tp: int) -> torch.Tensor:
    """[b, s, ...] -> [tp, b, s/tp, ...] (a view)."""
    return x.view(x.shape[0], tp, x.shape[1] // tp, *x.shape[2:]).transpose(0, 1)
