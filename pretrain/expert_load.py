"""How a mixture of experts spreads its tokens, recorded every log.interval steps: per MoE block the
busiest expert's token-expert pairs over the mean (1 = perfectly balanced) and the share of pairs
dropped by a capacity factor, summed over the data-parallel ranks since the last record, as
`moe/layer<i>/max_over_mean` and `moe/layer<i>/dropped`; and a warning when an expert received no
token for log.moe_idle_intervals records in a row (routing collapse)."""

import torch
import torch.distributed as dist
from torch import nn

from pretrain.metrics import MetricsWriter
from pretrain.model.moe import MoE


class ExpertLoad:
    def __init__(self, model: nn.Module, metrics: MetricsWriter, replica_group: dist.ProcessGroup,
                 idle_intervals: int, rank: int):
        self.layers = [(index, block.mlp) for index, block in enumerate(model.layers) if isinstance(block.mlp, MoE)]
        self.metrics, self.replica_group, self.idle_intervals, self.rank = metrics, replica_group, idle_intervals, rank
        self.idle = torch.zeros(len(self.layers), self.layers[0][1].args.num_experts, dtype=torch.long)
        self.warned: set[tuple[int, int]] = set()

    def write(self, step: int) -> None:
        """The record of `step` (collective over the data-parallel ranks); clears the counts."""
        load = torch.stack([moe.load for _, moe in self.layers])
        dist.all_reduce(load, group=self.replica_group)
        for _, moe in self.layers:
            moe.load.zero_()
        load = load.cpu()
        routed, dropped = load[:, :-1], load[:, -1]
        values = {}
        for row, (index, _) in enumerate(self.layers):
            pairs = routed[row].sum().clamp(min=1)
            values[f"layer{index}/max_over_mean"] = (routed[row].max() * routed.shape[1] / pairs).item()
            values[f"layer{index}/dropped"] = (dropped[row] / pairs).item()
        self.metrics.write(step, values, group="moe", console=False)
        self.idle = (self.idle + 1) * (routed == 0)
        if self.idle_intervals and self.rank == 0:
            for row, expert in (self.idle >= self.idle_intervals).nonzero().tolist():
                if (row, expert) not in self.warned:
                    self.warned.add((row, expert))
                    print(f"warning: step {step}: expert {expert} of block {self.layers[row][0]} received no token "
                          f"in the last {self.idle_intervals} log intervals (routing collapse?); consider a larger "
                          "model.moe.aux_loss_coeff", flush=True)
