"""The ZeRO-1/2 optimizer step without host synchronisation: gradient norm, clipping and the
skipping of non-finite updates all stay on the device.

Stock DeepSpeed (0.19) reads the gradient norm and its overflow flag on the host in every step
(`.item()`, `bool()`, blocking copies). With `deepspeed_config(..., device_update=True)` its ZeRO
optimizer neither measures, clips nor skips, and `DeviceUpdate` does all three in front of it:
the norm of the reduced gradient partitions (selected as DeepSpeed's get_grad_norm_direct does),
clipping as torch's fused AdamW `grad_scale`, skipping as its `found_inf` (the fused kernel then
leaves weights, moments and step count untouched). Counters are read at log steps only.

A skipped update does not hold the learning-rate schedule back: the schedule follows the step.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.comm import pg_utils
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


class DeviceUpdate:
    """Installs itself as `zero_optimizer.step`; `read()` (a host sync) reports what happened."""

    def __init__(self, zero_optimizer: DeepSpeedZeroOptimizer, grad_clip: float, max_bad_steps: int):
        if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
            raise TypeError(f"DeviceUpdate drives DeepSpeed's ZeRO-1/2 optimizer, not {type(zero_optimizer).__name__}")
        if not all(group.get("fused") for group in zero_optimizer.optimizer.param_groups):
            raise TypeError("DeviceUpdate needs torch's fused AdamW (its grad_scale/found_inf inputs)")
        self.zero = zero_optimizer
        self.grad_clip, self.max_bad_steps = grad_clip, max_bad_steps
        device = zero_optimizer.device
        self.grad_norm = torch.zeros((), device=device)  # of the last step; non-finite when it was skipped
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # in total
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
        self.skipped += bad
        self.bad_in_a_row = (self.bad_in_a_row + 1) * bad
        reached = (self.limit_step == 0) & (self.bad_in_a_row >= self.max_bad_steps)
        self.limit_step = torch.where(reached, self.steps, self.limit_step)
        return self.deepspeed_step(closure)

    @contextmanager
    def loading_checkpoint(self):
        """Checkpoints saved while DeepSpeed clipped (before DeviceUpdate existed) record its clip
        norm, which DeepSpeed refuses to load into an optimizer that measures no norm: accept
        them; clipping stays here, at this run's optimizer.grad_clip."""
        self.zero.compute_grad_norm = True
        try:
            yield
        finally:
            self.zero.compute_grad_norm, self.zero.clip_grad = False, 0.0

    def read(self) -> tuple[float, int, int]:
        """(gradient norm of the last step, updates skipped so far, the step at which
        max_bad_steps updates in a row had been skipped or 0), counted from this run's first step."""
        return float(self.grad_norm), int(self.skipped), int(self.limit_step)
