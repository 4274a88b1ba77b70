"""Runs lm-evaluation-harness (its `hf` model, fp32, on the CPU, offline) on exported folders and
local tasks, and writes each request's log-likelihood and greedy flag and each example's metrics
(this file never imports pretrain): python lm_eval_check.py SPEC.json OUT.json

SPEC: {"models": {name: folder}, "tasks": [task names], "include": folder of task YAMLs}.
OUT: {model name: {task: [{"doc_id", "log_likelihoods", "greedy", metric: value, ...}]}}."""

import json
import sys

import lm_eval
from lm_eval.tasks import TaskManager


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    manager = TaskManager(include_path=spec["include"])
    out = {}
    for name, folder in spec["models"].items():
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                          tasks=spec["tasks"], task_manager=manager, device="cpu", batch_size=4,
                                          log_samples=True, bootstrap_iters=0)
        out[name] = {task: [{"doc_id": sample["doc_id"], "log_likelihoods": [resp[0][0] for resp in sample["resps"]],
                             "greedy": [resp[0][1] for resp in sample["resps"]],
                             **{metric: sample[metric] for metric in ("acc", "acc_norm", "acc_bytes", "perplexity")
                                if metric in sample}}
                            for sample in sorted(samples, key=lambda s: s["doc_id"])]
                     for task, samples in results["samples"].items()}
        out[name]["metrics"] = results["results"]
    assert not any(module == "pretrain" or module.startswith("pretrain.") for module in sys.modules)
    with open(out_path, "w") as file:
        json.dump(out, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
