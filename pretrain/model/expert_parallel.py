"""Expert parallelism: the ranks of an expert-parallel group (parallel.ep consecutive data-parallel
ranks of the same tensor-parallel rank) share out a block's experts, num_experts / ep each, and
send every token-expert pair to the rank holding its expert. Under tensor parallelism each TP rank
holds its experts whole and exchanges its tokens within its own expert-parallel group.

A rank's pairs are sorted by expert (pretrain.model.moe.Routing), so the pairs for each peer are
one contiguous block. The counts per expert go first (one all-to-all of ep x local-experts
integers), then the rows (one all-to-all), which arrive grouped by sender; they are regrouped by
local expert for the grouped matmuls, and the results travel back the same way. The backward
pass of an all-to-all is the all-to-all of the gradients with the splits swapped, so an expert's
gradient holds the contributions of every rank of its group.

DeepSpeed reduces expert gradients over the expert-data-parallel group (the ranks holding the
same experts) and partitions their ZeRO-1/2 state there, but only for a module it recognises as
its own MoE and parameters marked `allreduce=False` with a `group_name`: `DeepSpeedRegistration`
is that recognition, and `check_deepspeed_groups` asserts at start-up that DeepSpeed's groups are
ours (otherwise it would average different experts at the same offsets, silently)."""

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn


def group_name(ep: int) -> str:
    """DeepSpeed's name of the expert groups of size ep."""
    return f"ep_size_{ep}"


def expert_parallel_ranks(world_size: int, ep: int, tp: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """The expert-parallel groups (ep consecutive data-parallel ranks of one TP rank) and the
    expert-data-parallel groups (the ranks at the same place in each group of that TP rank), as
    DeepSpeed lays them out given our mpu (groups._get_expert_parallel_ranks; ranks are ordered
    tensor-parallel fastest, so TP rank t's data-parallel ranks are t, t + tp, ...)."""
    parallel, data = [], []
    for tp_rank in range(tp):
        lane = list(range(tp_rank, world_size, tp))
        parallel += [lane[start:start + ep] for start in range(0, len(lane), ep)]
        data += [lane[first::ep] for first in range(ep)]
    return parallel, data


def new_expert_parallel_group(ep: int, tp: int) -> dist.ProcessGroup:
    """This rank's expert-parallel group (a collective: every rank creates every group)."""
    mine = None
    for ranks in expert_parallel_ranks(dist.get_world_size(), ep, tp)[0]:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def check_deepspeed_groups(ep: int, tp: int) -> None:
    """Stop unless DeepSpeed's expert-parallel and expert-data-parallel groups of this rank are ours."""
    parallel, data = expert_parallel_ranks(dist.get_world_size(), ep, tp)
    rank, name = dist.get_rank(), group_name(ep)
    ours = (next(r for r in parallel if rank in r), next(r for r in data if rank in r))
    theirs = (list(groups._get_expert_parallel_group_ranks(name)), list(groups._get_expert_data_parallel_group_ranks(name)))
    if ours != theirs:
        raise RuntimeError(f"rank {rank}: DeepSpeed's expert-parallel / expert-data-parallel groups {theirs} are not "
                           f"ours {ours}: expert gradients would be reduced over the wrong ranks")


def forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's expert groups with the grid they were drawn from: it keeps them by name
    (ep_size_N) for the life of the process, so a later grid in it (another TP size) would get them."""
    for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                     groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.clear()
    groups.expert_tensor_parallel_world_size = 1


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, *ctx.splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Rows input_splits[r] of x to rank r; output_splits[r] rows from rank r (differentiable)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def expert_parallel(experts: nn.Module, x: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup,
                    grad_reduce_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`experts` (this rank's share, num_experts / ep) applied to x's rows, which are sorted by
    expert with counts[e] rows for expert e of all num_experts: the rows go to their experts'
    ranks and come back in their order. `grad_reduce_group`: as for Experts (sequence parallelism:
    the TP peers holding the same experts, which received other tokens)."""
    ep = group.size()
    local = counts.numel() // ep
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # [sender, local expert]
    received = received.view(ep, local)
    send_splits, receive_splits = counts.view(ep, local).sum(1).tolist(), received.sum(1).tolist()
    rows = all_to_all(x, receive_splits, send_splits, group)
    expert_of_row = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(received.flatten())
    order = expert_of_row.argsort(stable=True)  # grouped by local expert, senders in rank order
    out = experts(rows[order], received.sum(0), grad_reduce_group)
    return all_to_all(out[order.argsort()], send_splits, receive_splits, group)


class DeepSpeedRegistration(DeepSpeedMoE):
    """Marks a block as a mixture of experts for DeepSpeed (engine and ZeRO-1/2 detect MoE layers by
    this class) and creates DeepSpeed's expert groups when the engine asks. It holds no parameters
    and computes nothing: the block's own modules do (pretrain.model.moe)."""

    def __init__(self, num_experts: int, ep: int):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build DeepSpeed's experts and gate
        self.num_experts, self.ep_size = num_experts, ep
        self.num_local_experts, self.expert_group_name = num_experts // ep, group_name(ep)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Groups drawn per TP rank from the mpu's data-parallel groups: DeepSpeed's layout for expert
        tensor parallelism. Its other mark of that (expert_tensor_parallel_world_size) is read only by
        DeepSpeed's own MoE layers and its ZeRO-0 / BF16_Optimizer norms, none of which run here
        (parallel.ep needs ZeRO-1/2, whose norm pretrain.update measures)."""
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_data_and_model_parallel(self.ep_size, mpu=groups.mpu)


def mark_expert_parameters(experts: nn.Module, ep: int, ep_rank: int, num_experts: int) -> None:
    """DeepSpeed's marks of expert parameters (reduced over the expert-data-parallel group, not all
    data-parallel ranks), and where this rank's experts sit in the full [num_experts, ...] tensors
    (pretrain.model.weights initialises and loads the slice)."""
    for param in experts.parameters():
        param.allreduce, param.group_name = False, group_name(ep)
        param.first_expert, param.num_experts = ep_rank * (num_experts // ep), num_experts
