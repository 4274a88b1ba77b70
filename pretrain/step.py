"""One optimizer step, and the loss sum of an evaluation pass, through the DeepSpeed engine: for
a whole model (parallel.pp=1: micro-batches through engine.backward/step) and for pipeline
stages (the pipeline engine's train_batch/eval_batch, fed on the first and last stage)."""

from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist

from pretrain.model.llama import LOSS_PARTS
from pretrain.model.moe import MoE
from pretrain.model.pipeline import Z_LOSS
from pretrain.update import UpdateGuard


def _on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(device, non_blocking=True)


class ModelSteps:
    """Steps of a whole model (at any TP size)."""

    def __init__(self, engine, device: torch.device, accumulation: int, guard: UpdateGuard,
                 nan_steps: list[int] = ()):
        self.engine, self.device, self.accumulation, self.guard = engine, device, accumulation, guard
        self.nan_steps = set(nan_steps)  # debug.inject_nan_steps

    def input(self, batches: Iterator[dict]) -> Iterator[dict]:
        return batches

    def _loss(self, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """Mean loss of a micro-batch (or with reduction="sum", this rank's sum over its tokens)."""
        labels = _on(self.device, batch["labels"])
        position_ids = _on(self.device, batch["position_ids"]) if "position_ids" in batch else None
        document_ids = _on(self.device, batch["document_ids"]) if "document_ids" in batch else None
        return self.engine(_on(self.device, batch["tokens"]), position_ids, document_ids, labels, reduction=reduction)

    def train(self, batches: Iterator[dict], step: int, log_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns this rank's contributions to the loss and to its parts
        besides the cross-entropy (pretrain.model.llama.LOSS_PARTS), summed over DP ranks and divided
        by dp x accumulation: the step's means."""
        total, parts = torch.zeros((), device=self.device), torch.zeros(len(LOSS_PARTS), device=self.device)
        for micro in range(self.accumulation):
            loss = self._loss(next(batches))
            if step in self.nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            if micro == self.accumulation - 1:
                self.guard.gradients_ready(log_step)
            self.engine.step()
            total += loss.detach()
            parts += self.engine.module.last_loss_parts
        return total, parts

    def loss_sum(self, batches: list[dict]) -> torch.Tensor:
        """Sum of the loss over every predicted token of `batches` (this rank's share)."""
        total = torch.zeros((), device=self.device)
        self.engine.eval()
        for batch in batches:
            total += self._loss(batch, reduction="sum")
        self.engine.train()
        return total


class PipelineSteps:
    """Steps of this rank's pipeline stage: the first and last stages read the micro-batches."""

    def __init__(self, engine, model, device: torch.device, accumulation: int, reads_data: bool,
                 moe: bool = False, pipeline_group: dist.ProcessGroup | None = None):
        self.engine, self.model, self.device, self.accumulation = engine, model, device, accumulation
        self.reads_data, self.moe, self.pipeline_group = reads_data, moe, pipeline_group

    def _feed(self, batches) -> Iterator[tuple]:
        """Micro-batch dicts -> the pipeline engine's ((tokens, position_ids[, document_ids]), labels),
        already on the device (DeepSpeed's own copy would block the host)."""
        for batch in batches:
            tokens = _on(self.device, batch["tokens"])
            position_ids = batch.get("position_ids")
            position_ids = torch.arange(tokens.shape[1], device=self.device).repeat(tokens.shape[0], 1) \
                if position_ids is None else _on(self.device, position_ids)
            extra = (_on(self.device, batch["document_ids"]),) if "document_ids" in batch else ()
            yield (tokens, position_ids, *extra), _on(self.device, batch["labels"])

    def input(self, batches: Iterator[dict]) -> Iterator[tuple] | None:
        return self._feed(batches) if self.reads_data else None

    def train(self, batches: Iterator[tuple] | None, step: int,
              log_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """As ModelSteps.train; the router losses of a mixture of experts are those of this rank's
        micro-batches (their blocks on every stage: summed over the pipeline), added to the loss,
        which the pipeline engine reports without them."""
        loss = self.engine.train_batch(data_iter=batches)  # already averaged over micro-batches and DP
        z_loss = (self.engine.agg_additional_losses or {}).get(Z_LOSS, torch.zeros((), device=self.device))
        parts = torch.zeros(len(LOSS_PARTS), device=self.device)
        parts[LOSS_PARTS.index(Z_LOSS)] = z_loss * self.accumulation
        if self.moe:
            routers = [module for module in self.model.modules() if isinstance(module, MoE)]
            router_losses = sum((r.router_losses.to(self.device) for r in routers), torch.zeros(2, device=self.device))
            dist.all_reduce(router_losses, group=self.pipeline_group)
            parts[1:] = router_losses
            for router in routers:
                router.router_losses = torch.zeros(2)
        return loss.detach() * self.accumulation + parts[1:].sum(), parts

    def loss_sum(self, batches: list[dict]) -> torch.Tensor:
        mean_loss = self.model.loss_fn  # None but on the last stage
        if mean_loss is not None:
            self.model.loss_fn = partial(mean_loss, reduction="sum")
        try:
            per_micro_batch = self.engine.eval_batch(iter(self._feed(batches)), num_micro_batches=len(batches))
        finally:
            self.model.loss_fn = mean_loss
        return per_micro_batch * len(batches)  # averaged over DP by the engine: summed over DP by the caller
