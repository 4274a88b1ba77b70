"""Counts host synchronisations in training steps, under torchrun: python sync_count.py SPEC.json OUT.json.

SPEC is {"base": [overrides], "runs": {name: [overrides]}}. For each run, every call that reads a
tensor's value on the host (.item(), .tolist(), .cpu(), .numpy(), bool(), float(), int()) made
while a non-log step after the first runs is recorded with where it was made; OUT holds, per run,
each rank's list of such call sites (empty: no host synchronisation in those steps).

Not counted, because they never touch the device: the data source (it runs on the host, in
DataLoader workers for shards) and the stop-signal flag, a CPU tensor all-reduced over a gloo
group each step (pretrain.signals.StopSignals)."""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import load
from pretrain.train import Trainer, train

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
HOST_ONLY = (("/pretrain/data/", None), ("/pretrain/signals.py", "agreed"))
FIRST_COUNTED_STEP = 2  # step 1 compiles, builds DeepSpeed's buffers and exchanges pipeline shapes


class Recorder:
    def __init__(self):
        self.counting = False
        self.sites: list[str] = []

    def record(self, method: str) -> None:
        frames = traceback.extract_stack()[:-2]
        if any(path in frame.filename and name in (None, frame.name) for frame in frames for path, name in HOST_ONLY):
            return
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        self.sites.append(f"{method}: {where}")


def install(recorder: Recorder) -> None:
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            if recorder.counting:
                recorder.counting = False  # what the recording itself does is not counted
                try:
                    recorder.record(_method)
                finally:
                    recorder.counting = True
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, method, counted)

    step = Trainer._step

    def counted_step(self, number, log_step):
        recorder.counting = not log_step and number >= FIRST_COUNTED_STEP  # until the next step begins
        return step(self, number, log_step)

    Trainer._step = counted_step


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    recorder = Recorder()
    install(recorder)
    results = {}
    for name, overrides in spec["runs"].items():
        recorder.sites = []
        train(load(None, spec["base"] + overrides))
        recorder.counting = False
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, recorder.sites)
        results[name] = gathered
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
