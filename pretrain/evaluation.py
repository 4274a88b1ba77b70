"""Validation during training: the mean loss per predicted token over the same held-out batches
every train.eval_interval steps (and at the last step), logged as valid/loss and valid/ppl."""

import math

import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.config import Config, Layout
from pretrain.data import stream
from pretrain.metrics import MetricsWriter


class Validator:
    def __init__(self, config: Config, data: stream.DataInfo | None, layout: Layout,
                 context: parallel.ParallelContext, steps, metrics: MetricsWriter, last_step: int):
        self.config, self.data, self.layout, self.context = config, data, layout, context
        self.steps, self.metrics, self.last_step = steps, metrics, last_step  # steps: pretrain.step's runner
        self.interval = config.train.eval_interval

    def should_validate(self, step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == self.last_step)

    @torch.no_grad()
    def run(self, step: int) -> float:
        """Mean loss per predicted token over the fixed validation batches (collective)."""
        batches = list(stream.validation_batches(self.config, self.data, self.layout, self.context.dp_rank,
                                                 self.context.cp_rank))
        totals = torch.zeros(2, device=self.context.device)  # loss sum, predicted tokens
        totals[1] = sum(int((batch["labels"] != -100).sum()) for batch in batches)
        totals[0] = self.steps.loss_sum(batches)
        dist.all_reduce(totals, group=self.context.replica_group)
        mean = (totals[0] / totals[1]).item()
        self.metrics.write(step, {"loss": mean, "ppl": math.exp(min(mean, 50.0))}, group="valid")
        return mean
