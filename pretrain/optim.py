"""AdamW parameter groups and learning-rate schedules."""

import math
from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import OptimizerConfig, Schedule, ScheduleConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embeddings) only, never on norms or biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        eps=config.eps, fused=True,  # one kernel; pretrain.update relies on its grad_scale/found_inf inputs
    )


def lr_multiplier(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for the optimizer step with 0-based index `step`."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio
    decay_start = total_steps - schedule.decay_fraction * total_steps

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.kind == Schedule.constant:
            return 1.0
        if schedule.kind == Schedule.wsd:
            if step < decay_start:
                return 1.0
            progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
            return 1.0 - (1.0 - floor) * progress
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, total_steps))
