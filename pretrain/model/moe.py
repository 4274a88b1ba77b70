"""Mixture of experts: a token-choice top-k router over SwiGLU experts, computed by grouped matmuls.

The router scores the experts (a softmax over them as Mixtral and Qwen3-MoE do, or each its own
sigmoid as DeepSeek-V3 does) and picks each token's top_k, weighted by their scores (renormalised
to sum to 1 unless `renormalize` is off). With aux-loss-free balancing (DeepSeek-V3) the choice
is by score + a per-expert bias that each optimizer step moves by bias_update_rate towards the
mean load over the global batch; the weights stay the scores. The bias is kept as an integer
count of such moves (`router_bias_steps`, checkpointed), so it is exact in any precision.

The (token, expert) pairs are sorted by
expert, so each expert's tokens are one contiguous block of rows; each projection is then one
grouped matmul over those blocks (`torch._grouped_mm` on a GPU of compute capability 9 or more,
one matmul per expert elsewhere), and the results are weighted and added back to their tokens.
No [tokens, experts, hidden] tensor exists. Dropless by default; with a capacity factor each
expert takes at most ceil(factor x tokens x top_k / experts) pairs, the first in token order,
and the rest are dropped (the token keeps its other experts and its residual).

Two losses keep the router in shape, computed over the tokens of one forward pass (a
micro-batch on one rank), so that any data-parallel layout with the same micro-batches gives
the same values: the load-balancing loss of Switch Transformer, aux_loss_coeff x experts x
sum_e f_e P_e (f_e the share of the token-expert pairs routed to e, P_e the mean router
probability of e; sigmoid scores normalised to sum to 1 per token), and the router z-loss of
ST-MoE, z_loss_coeff x mean logsumexp(logits)^2.

Parameters: `router.weight` [experts, hidden]; `experts.gate_proj` and `experts.up_proj`
[experts, expert_ffn, hidden], `experts.down_proj` [experts, hidden, expert_ffn] (each expert's
weight as nn.Linear stores it); with shared experts, `shared` is a SwiGLU every token passes.
Under expert parallelism (an `ep_group`) `experts` holds this rank's num_experts / ep of them
(pretrain.model.expert_parallel). Under tensor parallelism the router and experts (all of them, or
under expert parallelism this rank's share) are whole on every TP rank; with sequence parallelism
each TP rank routes its own seq/tp tokens, the router's and experts' gradients are summed over the
TP group, and the router losses and load counts are those of the whole micro-batch (counts and
sums all-reduced over the group).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from torch import nn

from pretrain.model.args import MoEArgs, RouterScoring
from pretrain.model.expert_parallel import DeepSpeedRegistration, expert_parallel, mark_expert_parameters
from pretrain.model.sequence_parallel import reduce_grad


def use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm's kernels need CUDA with compute capability >= 9.0 (Hopper)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [rows, in] whose first counts[0] rows go to expert 0, the next counts[1] to expert 1, ...;
    weight [experts, out, in] -> [rows, out], each block of rows times its expert's weight."""
    if use_grouped_mm(x):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    blocks = x.split(counts.tolist())
    return torch.cat([block @ weight[expert].t() for expert, block in enumerate(blocks)])


class Experts(nn.Module):
    """num_experts SwiGLU MLPs, stored as three [experts, ...] tensors."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor,
                grad_reduce_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """x: rows sorted by expert, counts[e] of them for expert e; `grad_reduce_group`: the ranks over
        which the weights' gradients are summed (each saw other tokens)."""
        gate, up, down = (reduce_grad(w, grad_reduce_group) if grad_reduce_group is not None else w
                          for w in (self.gate_proj, self.up_proj, self.down_proj))
        hidden = F.silu(grouped_linear(x, gate, counts)) * grouped_linear(x, up, counts)
        return grouped_linear(hidden, down, counts)


class Routing:
    """The token-expert pairs of a forward pass, sorted by expert, and what the losses and logs need."""

    def __init__(self, logits: torch.Tensor, args: MoEArgs, bias: torch.Tensor | None = None):
        """logits: [tokens, experts] in fp32; bias: added to the scores to choose the experts."""
        tokens, experts = logits.shape
        if args.scoring == RouterScoring.softmax:
            scores = self.probabilities = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            self.probabilities = scores / scores.sum(dim=-1, keepdim=True)
        if bias is None:
            weights, chosen = torch.topk(scores, args.top_k, dim=-1)
        else:
            chosen = torch.topk(scores + bias, args.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen)
        if args.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pairs = chosen.reshape(-1)  # pair p = (token p // top_k, its (p % top_k)-th expert)
        order = pairs.argsort(stable=True)
        self.routed = torch.bincount(pairs, minlength=experts)  # pairs per expert before any drop
        self.counts = self.routed
        if args.capacity_factor > 0:
            capacity = math.ceil(args.capacity_factor * tokens * args.top_k / experts)
            starts = self.routed.cumsum(0) - self.routed
            keep = torch.arange(order.numel(), device=order.device) - starts[pairs[order]] < capacity
            order = order[keep]
            self.counts = self.routed.clamp(max=capacity)
        self.token = order // args.top_k  # the token of each kept pair, in expert order
        self.weight = weights.reshape(-1)[order]


class _AttachLoss(torch.autograd.Function):
    """`out` as it is; in backward `loss` receives the gradient `scale`, as if it had been added to
    the training loss (which the engine scales by 1 / micro-batches): on a pipeline stage the router
    losses train without travelling to the last stage (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.like = scale, loss.detach()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full_like(ctx.like, ctx.scale), None


class MoE(nn.Module):
    """The mixture-of-experts MLP of a block: x [batch, seq, hidden] -> [batch, seq, hidden]. After a
    forward pass in which gradients are enabled, `aux_loss` and `z_loss` hold its two router losses
    (with their graphs; the model adds them to the training loss) and `last_load` the pairs routed
    to each expert and the pairs dropped; `record_load()` adds them to `load`, which
    pretrain.expert_load reads and clears at log steps (and, with aux-loss-free balancing, to
    `step_load`, which `update_bias` reads and clears after each optimizer step)."""

    def __init__(self, args: MoEArgs, hidden_size: int, shared: nn.Module | None,
                 ep_group: dist.ProcessGroup | None = None, tp_group: dist.ProcessGroup | None = None, layer: int = 0):
        super().__init__()
        self.args, self.ep_group, self.tp_group, self.layer = args, ep_group, tp_group, layer
        self.sequence_parallel = False  # x holds this TP rank's seq/tp tokens (set by pretrain.model.parallelize)
        # pipeline stages: the router losses train through the output, their gradient this (1 / micro-batches)
        self.attach_scale: float | None = None
        self.router_losses = torch.zeros(2)  # aux and z-loss summed over recorded passes, for the logs (pipeline)
        self.logged_losses = torch.zeros(3)  # this block's aux loss, z-loss and passes since the last load record
        ep = ep_group.size() if ep_group is not None else 1
        self.router = nn.Linear(hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts // ep, hidden_size, args.expert_ffn_hidden_size)
        self.shared = shared
        if ep_group is not None:
            mark_expert_parameters(self.experts, ep, ep_group.rank(), args.num_experts)
            self.deepspeed_registration = DeepSpeedRegistration(args.num_experts, ep)
        self.aux_loss = self.z_loss = None
        self.last_load: torch.Tensor | None = None
        self.register_buffer("load", torch.zeros(args.num_experts + 1, dtype=torch.long), persistent=False)
        if args.bias_update_rate > 0:
            self.register_buffer("router_bias_steps", torch.zeros(args.num_experts, dtype=torch.long))
            self.register_buffer("step_load", torch.zeros(args.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.sequence_parallel)

    def _forward(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        group = self.tp_group if sequence_parallel else None
        flat = x.reshape(-1, x.shape[-1])
        router = self.router.weight if group is None else reduce_grad(self.router.weight, group)
        logits = F.linear(flat, router).float()
        bias = self.args.bias_update_rate * self.router_bias_steps.float() if self.args.bias_update_rate > 0 else None
        routing = Routing(logits, self.args, bias)
        rows = flat[routing.token]
        if self.ep_group is None:
            out = self.experts(rows, routing.counts, group)
        else:
            out = expert_parallel(self.experts, rows, routing.counts, self.ep_group, group)
        out = out * routing.weight[:, None].to(x.dtype)
        out = torch.zeros_like(flat).index_add_(0, routing.token, out).view_as(x)
        if self.shared is not None:
            out = out + (self.shared(x) if sequence_parallel else self.shared.forward_whole(x))
        if torch.is_grad_enabled():
            self._losses(logits, routing, group)
            if self.attach_scale is not None:
                out = _AttachLoss.apply(out, self.aux_loss + self.z_loss, self.attach_scale)
        return out

    def _losses(self, logits: torch.Tensor, routing: Routing, group: dist.ProcessGroup | None) -> None:
        """Over the micro-batch: under sequence parallelism the counts and sums of every TP rank's tokens."""
        load = torch.cat([routing.routed, (routing.routed.sum() - routing.counts.sum())[None]])
        probabilities = routing.probabilities.sum(dim=0)
        squares = torch.logsumexp(logits, dim=-1).square().sum()
        tokens = logits.shape[0]
        if group is not None:
            dist.all_reduce(load, group=group)
            probabilities = reduce_from_tensor_model_parallel_region(probabilities, group)
            squares = reduce_from_tensor_model_parallel_region(squares, group)
            tokens *= group.size()
        share = load[:-1].float() / load[:-1].sum()
        self.aux_loss = self.args.aux_loss_coeff * self.args.num_experts * (share * probabilities / tokens).sum()
        self.z_loss = self.args.z_loss_coeff * squares / tokens
        self.last_load = load.detach()

    def record_load(self) -> None:
        """Count the last training forward pass's load (once per pass, also when activation
        checkpointing recomputes the block)."""
        self.load += self.last_load
        passes = torch.ones((), device=self.aux_loss.device)
        self.logged_losses = self.logged_losses.to(self.aux_loss.device) + torch.stack(
            [self.aux_loss.detach().float(), self.z_loss.detach().float(), passes])
        if self.args.bias_update_rate > 0:
            self.step_load += self.last_load[:-1]

    def record_losses(self) -> None:
        """Add the last training forward pass's router losses to `router_losses` (pipeline stages,
        whose blocks do not hand them to a loss)."""
        self.router_losses = self.router_losses.to(self.aux_loss.device) + torch.stack(
            [self.aux_loss, self.z_loss]).detach().float()

    def update_bias(self, group: dist.ProcessGroup) -> None:
        """After an optimizer step: each expert's bias one step up if the step's global batch (summed
        over `group`, the data-parallel ranks) routed it fewer pairs than the mean, down if more."""
        load = self.step_load.clone()
        dist.all_reduce(load, group=group)
        self.router_bias_steps += torch.sign(load.sum() - load * load.numel()).long()
        self.step_load.zero_()

    def forward_whole(self, x: torch.Tensor) -> torch.Tensor:
        """x holds whole sequences on every TP rank (decoding, pretrain.generate), as SwiGLU offers it."""
        return self._forward(x, False)


def update_router_biases(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Aux-loss-free balancing after an optimizer step: every MoE block's update_bias."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_bias(group)


def attach_router_losses(model: nn.Module, micro_batches: int) -> None:
    """Pipeline stages: every MoE block's router losses train through its output (see _AttachLoss)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.attach_scale = 1 / micro_batches
