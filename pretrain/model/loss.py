"""The output head and the next-token loss, computed together chunk by chunk.

`linear_cross_entropy(hidden, labels, weight, ...)` equals `cross_entropy(hidden @ weight.T, labels)`
but never holds the logits of more than `chunk_tokens` tokens: for each chunk it computes the
vocab-parallel logits, the loss and, when training, the gradients of the hidden states and of
the weight, then drops the logits. Only those gradients are kept for the backward pass (about
(tokens + vocab/tp) x hidden values instead of tokens x vocab/tp fp32 probabilities), and
backward merely scales them by the incoming gradient, so no matmul is repeated.

Under tensor parallelism each rank holds a contiguous slice of the (padded) vocabulary; the
softmax is completed with two all-reduces per chunk over `tp_group`, as in megatron-core's
vocab_parallel_cross_entropy. Vocabulary padding rows never enter the softmax. Under sequence
parallelism each TP rank brings its seq/tp tokens: they are gathered, and the gradient of the
hidden states is reduce-scattered at once, so only this rank's share of it is kept. Under context
parallelism the mean is over the tokens of the whole sequence (all context-parallel ranks).

PaLM's z-loss, z_loss x log(Z)^2 per token (Z the softmax normaliser, log Z = the logits'
logsumexp), comes out of the same chunks: log Z is what the softmax already completes, and its
gradient, 2 z_loss log Z x softmax, scales the probabilities the gradient is made of.
"""

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from pretrain.model.sequence_parallel import all_gather, from_sequence_order, reduce_scatter

IGNORE_INDEX = -100


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> None:
    if group.size() > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [tokens, h] x weight [local vocab, h] -> (summed loss over labels != IGNORE_INDEX, the
    z-loss part of it, not differentiable)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                tp_group: dist.ProcessGroup, chunk_tokens: int, wants_grad: bool,
                z_loss: float, sequence_parallel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """sequence_parallel: hidden holds this TP rank's tokens, labels those of every TP rank in
        gathered order; the gradient returned is of this rank's tokens."""
        if sequence_parallel:
            hidden = all_gather(hidden, tp_group).flatten(0, 1)
        local_vocab = weight.shape[0]
        first_column = tp_group.rank() * local_vocab
        padding = torch.arange(first_column, first_column + local_vocab, device=weight.device) >= vocab_size
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens]
            targets = labels[start:start + chunk_tokens]
            logits = (chunk @ weight.t()).float().masked_fill_(padding, float("-inf"))
            row_max = logits.max(dim=-1).values
            _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
            logits -= row_max[:, None]
            local = targets - first_column
            mine = (local >= 0) & (local < local_vocab)
            local = local.masked_fill(~mine, 0)
            rows = torch.arange(chunk.shape[0], device=chunk.device)
            target_logit = torch.where(mine, logits[rows, local], 0.0)
            sums = torch.stack([logits.exp_().sum(dim=-1), target_logit])  # logits hold exp(logits) from here
            _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
            valid = targets != IGNORE_INDEX
            total += torch.where(valid, sums[0].log() - sums[1], 0.0).sum()
            if z_loss:
                log_z = sums[0].log() + row_max
                z_total += torch.where(valid, log_z.square(), 0.0).sum()
            if wants_grad:
                probabilities = logits.div_(sums[0][:, None])
                if z_loss:
                    probabilities *= (1 + 2 * z_loss * log_z)[:, None]
                probabilities[rows, local] -= mine.to(probabilities.dtype)
                probabilities *= valid[:, None]
                grad_logits = probabilities.to(weight.dtype)
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
                grad_weight += (grad_logits.t() @ chunk).float()
        if wants_grad:
            if sequence_parallel:
                grad_hidden = reduce_scatter(grad_hidden.view(tp_group.size(), -1, grad_hidden.shape[-1]), tp_group)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        z_total *= z_loss
        ctx.mark_non_differentiable(z_total)
        return total + z_total, z_total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_z: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype),
                None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                         tp_group: dist.ProcessGroup, chunk_tokens: int, reduction: str = "mean",
                         sequence_parallel: bool = False, cp_group: dist.ProcessGroup | None = None,
                         z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of `hidden` [batch, seq, h] (identical on every TP rank; with
    `sequence_parallel` this TP rank's [batch, seq/tp, h]) projected by this rank's vocabulary slice
    `weight` [vocab/tp, h], against `labels` [batch, seq] (IGNORE_INDEX = no loss), and the z-loss
    part of it (detached).

    Mean over the predicted tokens (or with reduction="sum", this rank's sum); equals
    cross_entropy(logits, labels) of the full logits, whose fp32 copy is never materialised, plus,
    when gradients are wanted (training), z_loss x logsumexp(logits)^2 per token; a pass without
    gradients (evaluation) gives the cross-entropy alone. With a context-parallel `cp_group` the
    mean is the whole sequence's: each rank returns its sum times cp over the group's token count,
    which averaged over the group (as gradients are) is that mean."""
    if sequence_parallel:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = from_sequence_order(labels, tp_group.size())  # the order the gathered tokens come in
    else:
        flat_hidden = copy_to_tensor_model_parallel_region(hidden.reshape(-1, hidden.shape[-1]), group=tp_group)
    flat_labels = labels.reshape(-1)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, z_part = _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, vocab_size, tp_group, chunk_tokens,
                                              wants_grad, z_loss if wants_grad else 0.0, sequence_parallel)
    if reduction == "sum":
        return total, z_part
    count = (flat_labels != IGNORE_INDEX).sum()
    if cp_group is not None and cp_group.size() > 1:
        dist.all_reduce(count, group=cp_group)
        total, z_part = total * cp_group.size(), z_part * cp_group.size()
    count = count.clamp(min=1)
    return total / count, z_part / count
