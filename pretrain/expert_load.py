"""How a mixture of experts spreads its tokens, recorded every log.interval steps: per MoE block the
busiest expert's token-expert pairs over the mean (1 = perfectly balanced) and the share of pairs
dropped by a capacity factor, summed over the data-parallel ranks since the last record, as
`moe/layer<i>/max_over_mean` and `moe/layer<i>/dropped`, and its router losses (aux loss and
z-loss, the mean over those passes) as `moe/layer<i>/aux_loss` and `moe/layer<i>/z_loss`; and a warning when an expert received no
token for log.moe_idle_intervals records in a row (routing collapse). Pipeline stages hold their
own blocks: their records are gathered over the pipeline."""

import torch
import torch.distributed as dist
from torch import nn

from pretrain.metrics import MetricsWriter
from pretrain.model.moe import MoE


class ExpertLoad:
    def __init__(self, model: nn.Module, metrics: MetricsWriter, replica_group: dist.ProcessGroup,
                 pipeline_group: dist.ProcessGroup, num_experts: int, idle_intervals: int, warns: bool):
        """model: the whole model or this rank's pipeline stage; `warns`: this rank prints the warnings
        of its stage's blocks."""
        self.layers = [(module.layer, module) for module in model.modules() if isinstance(module, MoE)]
        self.metrics, self.replica_group, self.pipeline_group = metrics, replica_group, pipeline_group
        self.idle_intervals, self.warns = idle_intervals, warns
        self.idle = torch.zeros(len(self.layers), num_experts, dtype=torch.long)
        self.warned: set[tuple[int, int]] = set()

    def write(self, step: int) -> None:
        """The record of `step` (collective over the data-parallel ranks and the pipeline); clears the counts."""
        values = self._values(step) if self.layers else {}
        if self.pipeline_group.size() > 1:
            stages = [None] * self.pipeline_group.size()
            dist.all_gather_object(stages, values, group=self.pipeline_group)
            values = {name: value for stage in stages for name, value in stage.items()}
        self.metrics.write(step, values, group="moe", console=False)

    def _values(self, step: int) -> dict[str, float]:
        load = torch.stack([moe.load for _, moe in self.layers])
        losses = torch.stack([moe.logged_losses.to(load.device) for _, moe in self.layers])
        dist.all_reduce(load, group=self.replica_group)
        dist.all_reduce(losses, group=self.replica_group)
        for _, moe in self.layers:
            moe.load.zero_()
            moe.logged_losses.zero_()
        load, losses = load.cpu(), losses.cpu()
        routed, dropped = load[:, :-1], load[:, -1]
        values = {}
        for row, (index, _) in enumerate(self.layers):
            pairs = routed[row].sum().clamp(min=1)
            values[f"layer{index}/max_over_mean"] = (routed[row].max() * routed.shape[1] / pairs).item()
            values[f"layer{index}/dropped"] = (dropped[row] / pairs).item()
            passes = losses[row, 2].clamp(min=1)
            values[f"layer{index}/aux_loss"] = (losses[row, 0] / passes).item()
            values[f"layer{index}/z_loss"] = (losses[row, 1] / passes).item()
        self.idle = (self.idle + 1) * (routed == 0)
        if self.idle_intervals and self.warns:
            for row, expert in (self.idle >= self.idle_intervals).nonzero().tolist():
                if (row, expert) not in self.warned:
                    self.warned.add((row, expert))
                    print(f"warning: step {step}: expert {expert} of block {self.layers[row][0]} received no token "
                          f"in the last {self.idle_intervals} log intervals (routing collapse?); consider a larger "
                          "model.moe.aux_loss_coeff", flush=True)
        return values
