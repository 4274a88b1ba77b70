"""Muon (momentum orthogonalised by Newton-Schulz) on the hidden matrices, AdamW on the rest,
with the update of every matrix equal to the one the whole, unsharded matrix would get.

Orthogonalisation is defined on a whole matrix, so a tensor-parallel shard or a ZeRO partition
is not enough: the step makes each matrix whole, orthogonalises it and keeps this rank's piece.
- Tensor parallelism: gather, orthogonalise, slice. The TP ranks of a matrix all-gather their
  shards, every one of them orthogonalises the whole matrix, and each keeps its own chunk. TP
  groups are small and inside a node, the math is the same on every rank with no result to send
  back, and identical inputs give identical bits.
- ZeRO-1/2: DeepSpeed's optimizer steps flat 1-D partitions of each parameter group, one per
  data-parallel rank, cut without regard to matrix boundaries. The partition decides the work:
  a rank orthogonalises the matrices its partition touches (a matrix straddling two partitions
  on both ranks), receiving the pieces of them that its neighbours hold with one all_to_all, so
  the Newton-Schulz work is spread over the data-parallel ranks without a second exchange.
- The fused qkv projection is cut into q, k and v (pretrain.model.hf.split_qkv) and each is
  orthogonalised apart; gate and up are separate parameters already.
- Each logical matrix's update is scaled by update_rms x sqrt(max(rows, columns)) (Moonlight):
  an orthogonal matrix then has the RMS of a typical AdamW update, so one lr and one weight decay
  serve both.

The momentum buffer lives beside the fp32 master weights (partitioned at ZeRO-1/2); the step holds
one matrix at a time besides it and consumes the gradients in place. Clipping and
skipping come from pretrain.update.DeviceUpdate as torch's fused AdamW takes them (`grad_scale`
divides the gradients, `found_inf` leaves weights and state untouched, with no host sync).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

DEEPSPEED_LAYOUT = "0.19."  # the ZeRO-1/2 layout use_zero_partitions reads; tests/test_muon.py holds us to it


@dataclass(frozen=True)
class MuonSettings:
    """optimizer.muon_* (pretrain.config), the Newton-Schulz dtype resolved for the device."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    update_rms: float = 0.2
    ns_dtype: torch.dtype = torch.bfloat16


def newton_schulz(matrix: torch.Tensor, steps: int, coefficients: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """About U V^T for matrix = U S V^T: Muon's quintic iteration, whose coefficients drive the
    singular values quickly into roughly [0.7, 1.2] rather than exactly to 1."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(matrix.dtype)


@dataclass(frozen=True)
class Matrix:
    """A hidden matrix as Muon sees it: TP ranks hold contiguous chunks along `partition_dim`;
    `split` cuts the whole matrix into the logical matrices orthogonalised apart and `merge`
    puts their updates back together."""

    partition_dim: int
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]] = lambda whole: (whole,)
    merge: Callable[..., torch.Tensor] = lambda whole: whole


@dataclass(frozen=True)
class Placed:
    """A matrix in a flat buffer: its first element and this TP rank's shape of it."""

    matrix: Matrix
    offset: int
    shape: torch.Size

    @property
    def end(self) -> int:
        return self.offset + math.prod(self.shape)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if start < end else (a[0], a[0])


class Partition:
    """The flat tensor an optimizer parameter is: data-parallel rank r's slice [r x size, (r+1) x size)
    of a buffer holding `placed` matrices (ZeRO-1/2), or one whole matrix (no `dp_group`). It
    knows the matrices its slice touches and which of their elements other ranks hold."""

    def __init__(self, placed: list[Placed], size: int, dp_group: dist.ProcessGroup | None):
        ranks, rank = (1, 0) if dp_group is None else (dp_group.size(), dp_group.rank())
        self.dp_group, self.start, self.end = dp_group, rank * size, (rank + 1) * size
        slices = [(r * size, (r + 1) * size) for r in range(ranks)]
        windows = [self._window(placed, slice_) for slice_ in slices]
        self.touched = [p for p in placed if p.offset < self.end and p.end > self.start]
        self.window = windows[rank]  # [first, end) of the matrices this slice touches
        self.sends = [(self.start, self.start) if r == rank else _overlap(slices[rank], windows[r])
                      for r in range(ranks)]
        overlaps = [_overlap(slice_, self.window) for slice_ in slices]
        self.receives = [0 if r == rank else end - start for r, (start, end) in enumerate(overlaps)]

    @staticmethod
    def _window(placed: list[Placed], slice_: tuple[int, int]) -> tuple[int, int]:
        touched = [p for p in placed if p.offset < slice_[1] and p.end > slice_[0]]
        return (touched[0].offset, touched[-1].end) if touched else (slice_[0], slice_[0])

    def exchange(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Given this rank's slice of the buffer, the window's elements before and after it, from
        the ranks that hold them (collective over dp_group)."""
        if self.dp_group is None or self.dp_group.size() == 1:
            return values[:0], values[:0]
        send = torch.cat([values[a - self.start:b - self.start] for a, b in self.sends])
        received = values.new_empty(sum(self.receives))
        dist.all_to_all_single(received, send, self.receives, [b - a for a, b in self.sends], group=self.dp_group)
        before = max(self.start - self.window[0], 0)
        return received[:before], received[before:]

    def shard(self, values: torch.Tensor, before: torch.Tensor, after: torch.Tensor, placed: Placed) -> torch.Tensor:
        """This TP rank's shard of `placed`, flat: from before, this rank's slice and after."""
        pieces = []
        if placed.offset < self.start:
            pieces.append(before[placed.offset - self.window[0]:min(placed.end, self.start) - self.window[0]])
        own = _overlap((placed.offset, placed.end), (self.start, self.end))
        if own[1] > own[0]:
            pieces.append(values[own[0] - self.start:own[1] - self.start])
        if placed.end > self.end:
            pieces.append(after[max(placed.offset, self.end) - self.end:placed.end - self.end])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class Muon(torch.optim.AdamW):
    """Muon on the parameter groups marked `muon` (2-D matrices described by `matrices`), torch's
    fused AdamW on the others. Parameters are the model's (DeepSpeed ZeRO-0) or, after
    `use_zero_partitions`, DeepSpeed ZeRO-1/2's flat fp32 partitions."""

    def __init__(self, groups: list[dict], matrices: dict[nn.Parameter, Matrix], settings: MuonSettings,
                 tp_group: dist.ProcessGroup, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.matrices, self.settings, self.tp_group = matrices, settings, tp_group
        self.partitions = {id(p): Partition([Placed(matrices[p], 0, p.shape)], p.numel(), None)
                           for group in self.param_groups if group["muon"] for p in group["params"]}

    def __setstate__(self, state: dict) -> None:
        # Adam's would upgrade legacy states by their step count, which Muon's states do not have
        torch.optim.Optimizer.__setstate__(self, state)

    def use_zero_partitions(self, zero) -> None:
        """Step the flat partitions of DeepSpeed's ZeRO-1/2 optimizer `zero` instead of the model's
        parameters (DeepSpeed 0.19's layout: parameter group i is flattened in the order and at the
        offsets of round_robin_bit16_groups/offsets[i], padded at the end, and cut into equal partitions)."""
        if not deepspeed.__version__.startswith(DEEPSPEED_LAYOUT):
            raise RuntimeError(f"Muon with ZeRO-1/2 reads the flat-partition layout of DeepSpeed {DEEPSPEED_LAYOUT}x, "
                               f"not {deepspeed.__version__}: install deepspeed=={DEEPSPEED_LAYOUT}* or use ZeRO-0")
        self.partitions = {}
        for index, group in enumerate(self.param_groups):
            if group["muon"]:
                params, offsets = zero.round_robin_bit16_groups[index], zero.round_robin_bit16_offsets[index]
                placed = [Placed(self.matrices[p], offset, p.shape) for p, offset in zip(params, offsets)]
                partition = Partition(placed, int(zero.partition_size[index]), zero.real_dp_process_group[index])
                self.partitions[id(zero.single_partition_of_fp32_groups[index])] = partition

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [group for group in groups if not group["muon"]]
        try:
            if self.param_groups:
                super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group["muon"]:
                self._muon_step(group)

    def _muon_step(self, group: dict) -> None:
        """The gradients are consumed in place: scaled, then turned into the update's direction."""
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = param.grad
            momentum = torch.full((), self.settings.momentum, device=grad.device)
            lr = torch.full((), group["lr"], device=grad.device)
            if grad_scale is not None:
                grad.div_(grad_scale)
            if found_inf is not None:  # a skipped update changes nothing: decided on the device, without a host sync
                bad = found_inf > 0
                grad.masked_fill_(bad, 0.0)
                momentum, lr = torch.where(bad, 1.0, momentum), torch.where(bad, 0.0, lr)
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"]
            buffer.mul_(momentum).add_(grad)
            direction = grad.addcmul_(buffer, momentum) if self.settings.nesterov else buffer
            self._update(param, direction.view(-1), self.partitions[id(param)], lr, group["weight_decay"])

    def _update(self, param: torch.Tensor, direction: torch.Tensor, partition: Partition, lr: torch.Tensor,
                decay: float) -> None:
        """Muon's update of `param` (this rank's slice of `partition`): every matrix the slice touches
        made whole, orthogonalised per logical part, and this rank's piece applied, one at a time."""
        before, after = partition.exchange(direction)
        tp, tp_rank, flat = self.tp_group.size(), self.tp_group.rank(), param.view(-1)
        for placed in partition.touched:
            shard = partition.shard(direction, before, after, placed)
            if tp > 1:
                gathered = shard.new_empty(tp * shard.numel())
                dist.all_gather_single(gathered, shard, group=self.tp_group)
                shard = gathered
            dim = placed.matrix.partition_dim
            whole = torch.cat(shard.view(tp, *placed.shape).unbind(0), dim=dim)
            mine = self._orthogonalise(whole, placed.matrix).chunk(tp, dim=dim)[tp_rank].flatten()
            start, end = _overlap((placed.offset, placed.end), (partition.start, partition.end))
            target = flat[start - partition.start:end - partition.start]
            target.mul_(1 - lr * decay).sub_(mine[start - placed.offset:end - placed.offset] * lr)

    def _orthogonalise(self, whole: torch.Tensor, matrix: Matrix) -> torch.Tensor:
        s = self.settings
        return matrix.merge(*(newton_schulz(part, s.ns_steps, s.ns_coefficients, s.ns_dtype)
                              * (s.update_rms * math.sqrt(max(part.shape))) for part in matrix.split(whole)))
