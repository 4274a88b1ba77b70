"""Stop signals: SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or a preemption) let
training finish its step, save and exit with EXIT_STOPPED so that the job is requeued."""

import signal

import torch
import torch.distributed as dist

EXIT_STOPPED = 75  # after SIGTERM/SIGUSR1: checkpoint saved, requeue the job to continue (EX_TEMPFAIL)


class StopSignals:
    """Records SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or a preemption) so that
    training can finish its step, save and exit; all ranks agree on the step through a CPU
    all-reduce (no device synchronisation)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal (collective)."""
        flag = torch.tensor([1 if self.received else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
