"""What happens to an update with a non-finite loss or gradient, and the gradient norm reported
at log steps: one interface (UpdateGuard), one implementation per ZeRO stage and precision,
chosen once by `update_guard()`:
- ZeRO-1/2 (DeviceUpdate): skipped on the device and counted; clipping moves here too.
- ZeRO-0 in bf16 (DeepSpeedSkips): DeepSpeed's bf16 optimizer skips it; counted here.
- ZeRO-0 in fp32 and ZeRO-3 (StopOnNonFinite): DeepSpeed cannot skip it, so the run stops.
Each stops the run once train.max_bad_steps updates in a row were skipped.

The ZeRO-1/2 optimizer step runs without host synchronisation: gradient norm, clipping and the
skipping of non-finite updates all stay on the device. Stock DeepSpeed (0.19) reads the gradient
norm and its overflow flag on the host in every step (`.item()`, `bool()`, blocking copies). At
DEVICE_UPDATE_STAGES its ZeRO optimizer (configured by pretrain.engine) neither measures, clips
nor skips, and `DeviceUpdate` does all three in front of it: the norm of the reduced gradient
partitions (selected as DeepSpeed's get_grad_norm_direct does), clipping as torch's fused AdamW
`grad_scale`, skipping as its `found_inf` (the fused kernel then leaves weights, moments and step
count untouched; pretrain.muon.Muon takes both alike). Counters are read at log steps only.

A skipped update does not hold the learning-rate schedule back: the schedule follows the step.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.comm import pg_utils
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

DEVICE_UPDATE_STAGES = (1, 2)  # ZeRO stages whose optimizer step DeviceUpdate keeps on the device
ADVICE = "lower optimizer.lr, check the data, or resume from an earlier checkpoint"


class UpdateGuard:
    """The interface the training loop calls; `skipped` counts the updates skipped so far in
    this run (as of the last report)."""

    skipped = 0

    def gradients_ready(self, log_step: bool) -> None:
        """After the last micro-batch's backward of a step, before the optimizer step (pp=1)."""

    def step_finished(self, step: int, loss: torch.Tensor) -> None:
        """After an optimizer step, with this rank's loss contribution."""

    def report(self, step: int) -> float:
        """At a log step: the gradient norm of the last update (before clipping); raises
        FloatingPointError once train.max_bad_steps updates in a row were skipped."""
        raise NotImplementedError


def update_guard(engine, zero_stage: int, bf16: bool, grad_clip: float, max_bad_steps: int, model: torch.nn.Module,
                 tp_group: dist.ProcessGroup) -> UpdateGuard:
    """The guard of an engine of this ZeRO stage and precision."""
    if zero_stage in DEVICE_UPDATE_STAGES:
        return DeviceUpdate(engine.optimizer, grad_clip, max_bad_steps)
    if zero_stage == 0 and bf16:
        return DeepSpeedSkips(engine, max_bad_steps)
    return StopOnNonFinite(engine, zero_stage, "bf16" if bf16 else "fp32",
                           measure_norm=(model, tp_group) if zero_stage == 0 else None)


@contextmanager
def loading_checkpoint(engine, zero_stage: int):
    """Around DeepSpeed's load_checkpoint. Checkpoints saved while DeepSpeed clipped (before
    DeviceUpdate existed) record its clip norm, which DeepSpeed refuses to load into a ZeRO-1/2
    optimizer that measures no norm: accept them; clipping stays with DeviceUpdate, at this
    run's optimizer.grad_clip."""
    if zero_stage not in DEVICE_UPDATE_STAGES:
        yield
        return
    zero = engine.optimizer
    zero.compute_grad_norm = True
    try:
        yield
    finally:
        zero.compute_grad_norm, zero.clip_grad = False, 0.0


def _too_many(in_a_row: int, max_bad_steps: int, step: int) -> FloatingPointError:
    return FloatingPointError(f"{in_a_row} updates in a row skipped for a non-finite loss (train.max_bad_steps="
                              f"{max_bad_steps}) at step {step}: {ADVICE}")


class DeviceUpdate(UpdateGuard):
    """Installs itself as `zero_optimizer.step`; `report()` (a host sync) reads what happened."""

    def __init__(self, zero_optimizer: DeepSpeedZeroOptimizer, grad_clip: float, max_bad_steps: int):
        if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
            raise TypeError(f"DeviceUpdate drives DeepSpeed's ZeRO-1/2 optimizer, not {type(zero_optimizer).__name__}")
        if not all(group.get("fused") for group in zero_optimizer.optimizer.param_groups):
            raise TypeError("DeviceUpdate needs torch's fused AdamW (its grad_scale/found_inf inputs)")
        self.zero = zero_optimizer
        self.grad_clip, self.max_bad_steps = grad_clip, max_bad_steps
        device = zero_optimizer.device
        self.grad_norm = torch.zeros((), device=device)  # of the last step; non-finite when it was skipped
        self.steps = torch.zeros((), dtype=torch.int64, device=device)  # taken in this run
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.limit_step = torch.zeros((), dtype=torch.int64, device=device)  # first step of max_bad_steps in a row
        self.deepspeed_step = zero_optimizer.step
        zero_optimizer.step = self.step

    def _norm(self) -> torch.Tensor:
        """L2 norm of the reduced gradients: each rank's partition, parameters replicated across
        TP ranks counted on TP rank 0 and pipeline-replicated ones (tied embeddings) once."""
        zero, squares = self.zero, []
        for index in range(len(zero.bit16_groups)):
            gradients = [g for g in zero.averaged_gradients[index] if not getattr(g, "_zero_padding", False)]
            for gradient, param in zip(gradients, zero.params_in_partition[index]):
                if getattr(param, "ds_pipe_replicated", False):
                    continue
                if is_model_parallel_parameter(param) or zero.model_parallel_rank == 0:
                    squares.append(torch.linalg.vector_norm(gradient, dtype=torch.float32).square())
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=zero.device)
        dist.all_reduce(total, group=zero.dp_process_group)
        if pg_utils.is_parallel(zero.model_parallel_group):
            dist.all_reduce(total, group=zero.model_parallel_group)
        return total.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        norm = self._norm()
        bad = ~torch.isfinite(norm)
        adamw = self.zero.optimizer
        adamw.found_inf = bad.float()
        if self.grad_clip > 0:  # DeepSpeed's clipping rule, grad / max(1, (norm + 1e-6) / clip)
            adamw.grad_scale = torch.where(bad, 1.0, ((norm + 1e-6) / self.grad_clip).clamp(min=1.0))
        self.grad_norm = norm
        self.steps += 1
        self.skipped_steps += bad
        self.bad_in_a_row = (self.bad_in_a_row + 1) * bad
        reached = (self.limit_step == 0) & (self.bad_in_a_row >= self.max_bad_steps)
        self.limit_step = torch.where(reached, self.steps, self.limit_step)
        return self.deepspeed_step(closure)

    def report(self, step: int) -> float:
        skipped, steps, limit_step = int(self.skipped_steps), int(self.steps), int(self.limit_step)
        if skipped > self.skipped and dist.get_rank() == 0:
            print(f"step {step}: {skipped - self.skipped} update(s) skipped for a non-finite loss or gradient "
                  f"since the last log step ({skipped} in this run)", flush=True)
        self.skipped = skipped
        if limit_step:
            raise _too_many(self.max_bad_steps, self.max_bad_steps, step - steps + limit_step)
        return float(self.grad_norm)


class DeepSpeedSkips(UpdateGuard):
    """ZeRO-0 in bf16: DeepSpeed's optimizer skips an update whose gradient norm is not finite."""

    def __init__(self, engine, max_bad_steps: int):
        self.engine, self.max_bad_steps = engine, max_bad_steps
        self.seen, self.bad_in_a_row = engine.skipped_steps, 0

    def step_finished(self, step: int, loss: torch.Tensor) -> None:
        bad, self.seen = self.engine.skipped_steps > self.seen, self.engine.skipped_steps
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        if not bad:
            return
        self.skipped += 1
        if dist.get_rank() == 0:
            print(f"step {step}: non-finite loss or gradient, update skipped ({self.bad_in_a_row} in a row)",
                  flush=True)
        if self.bad_in_a_row >= self.max_bad_steps:
            raise _too_many(self.bad_in_a_row, self.max_bad_steps, step)

    def report(self, step: int) -> float:
        return float(self.engine.get_global_grad_norm())


class StopOnNonFinite(UpdateGuard):
    """ZeRO-0 in fp32 and ZeRO-3: DeepSpeed cannot skip an update, so a non-finite loss stops
    the run on every rank at once. `measure_norm` (model, tp_group): DeepSpeed clips ZeRO-0 fp32
    gradients without keeping the norm, so it is measured here at log steps."""

    def __init__(self, engine, zero_stage: int, precision: str,
                 measure_norm: tuple[torch.nn.Module, dist.ProcessGroup] | None):
        self.engine, self.zero_stage, self.precision, self.measure_norm = engine, zero_stage, precision, measure_norm
        self.grad_norm: float | None = None

    def gradients_ready(self, log_step: bool) -> None:
        if log_step and self.measure_norm is not None:
            self.grad_norm = reduced_grad_norm(*self.measure_norm)

    def step_finished(self, step: int, loss: torch.Tensor) -> None:
        nonfinite = (~torch.isfinite(loss)).to(torch.int32)
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)  # every rank stops together
        if nonfinite.item():
            raise FloatingPointError(
                f"non-finite loss at step {step}: with optimizer.zero_stage={self.zero_stage} and {self.precision} "
                "DeepSpeed cannot skip the update, so training stops here; ZeRO-1/2 skip such updates and count them")

    def report(self, step: int) -> float:
        return self.grad_norm if self.measure_norm is not None else float(self.engine.get_global_grad_norm())


def reduced_grad_norm(model: torch.nn.Module, tp_group: dist.ProcessGroup) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients; parameters replicated
    across TP ranks are counted once."""
    squares = torch.zeros((), device=next(model.parameters()).device)
    for param in model.parameters():
        if param.grad is not None and (param.tensor_model_parallel or tp_group.rank() == 0):
            squares += param.grad.float().pow(2).sum()
    dist.all_reduce(squares, group=tp_group)
    return squares.sqrt().item()
