"""Runs several trainings in one launch (under torchrun or as one process) and writes each
run's per-step losses and gradient norms as JSON: python dist_runs.py SPEC.json OUT.json.

SPEC is {"base": [overrides], "runs": {name: [overrides]}}. Launch costs dominate on small
machines, so the parity tests put all the layouts of one world size into one launch."""

import json
import sys

import torch.distributed as dist

from pretrain.config import load
from pretrain.train import train


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist.init_process_group("gloo")  # kept across the runs below; torchrun or the caller set the env
    results = {}
    for name, overrides in spec["runs"].items():
        config = load(spec.get("config"), spec["base"] + overrides)
        result = train(config)
        results[name] = {"loss": result.losses, "grad_norm": result.grad_norms}
    if dist.get_rank() == 0:
        with open(out_path, "w") as out:
            json.dump(results, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
