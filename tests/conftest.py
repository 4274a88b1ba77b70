"""Shared fixtures: running the package in fresh processes (plain or under torchrun)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun(nproc: int, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS` on a free local port; fails the test with its output on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_layouts(tmp_path: Path, nproc: int, base: list[str], runs: dict[str, list[str]],
                config: str | None = None, split_check: list[str] | None = None) -> dict:
    """Train each named layout in one launch of `nproc` processes.
    Returns name -> {"loss": {step: value}, "grad_norm": {step: value}}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec, out = tmp_path / f"spec{nproc}.json", tmp_path / f"losses{nproc}.json"
    runs = {name: overrides + [f"log.dir={tmp_path / name}"] for name, overrides in runs.items()}
    extra = {"split_check": split_check} if split_check else {}
    spec.write_text(json.dumps({"config": config, "base": base, "runs": runs, **extra}))
    torchrun(nproc, str(TESTS / "dist_runs.py"), str(spec), str(out))
    results = json.loads(out.read_text())
    return {name: run if name == "split_check" else
            {metric: {int(step): value for step, value in series.items()} for metric, series in run.items()}
            for name, run in results.items()}


GENERATE_STEPS, GENERATE_SEQ = 6, 32
SAMPLE = ["log.sample_interval=2", 'log.sample_prompts=["def ","alpha "]', "log.sample_tokens=5"]


@pytest.fixture(scope="session")
def generate_data(tmp_path_factory) -> Path:
    """A tokenizer, training and validation shards of random documents, and downstream task files
    (tests/downstream_tasks.py, described by downstream.json)."""
    from downstream_tasks import write_tasks
    from pretrain.data.build import build_shards
    from pretrain.tokenizer import train_tokenizer
    from test_data import random_documents

    root = tmp_path_factory.mktemp("generate")
    for name, seed, count in (("train", 1, 300), ("valid", 2, 40)):
        documents = random_documents(count, seed)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    train_tokenizer([root / "train.jsonl"], vocab_size=360, out=root / "tok")
    for name in ("train", "valid"):
        build_shards([root / f"{name}.jsonl"], root / "tok", GENERATE_SEQ, root / name, shard_samples=64,
                     progress=False)
    (root / "downstream.json").write_text(json.dumps(write_tasks(root / "tasks")))
    return root


def generate_base(data: Path) -> list[str]:
    return [f"data.path={data / 'train'}", f"data.valid_path={data / 'valid'}", "data.num_workers=0",
            f"model.seq_len={GENERATE_SEQ}", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
            "model.num_kv_heads=2", "model.ffn_hidden_size=96", "optimizer.lr=3e-3", "schedule.warmup_steps=1",
            f"train.max_steps={GENERATE_STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8",
            "log.interval=1", f"train.eval_interval={GENERATE_STEPS}", "train.eval_steps=2"]


def downstream_settings(data: Path, fewshot: int | None = None) -> list[str]:
    """downstream.* of the runs that score generate_data's tasks (every 3 steps, with every example logged)."""
    tasks = json.loads((data / "downstream.json").read_text())["tasks"]
    return [f"downstream.tasks={json.dumps(tasks)}", "downstream.interval=3", "downstream.log_examples=true",
            *([f"downstream.fewshot={fewshot}"] if fewshot is not None else [])]


@pytest.fixture(scope="session")
def generate_runs(generate_data, tmp_path_factory) -> dict:
    """TP2 x PP2 with a checkpoint (4 processes); in one launch of 2 processes, TP2 and PP2 with
    samples and downstream tasks and without either, and DP2 with compiled blocks with few-shot
    downstream tasks and without (tests/test_generate.py, tests/test_downstream.py)."""
    data, root = generate_data, tmp_path_factory.mktemp("runs")
    wandb = {"tp2": ["log.wandb=true", "log.wandb_project=generate-test"], "pp2": []}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        runs = run_layouts(root, 4, generate_base(data), {
            "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "optimizer.zero_stage=1", f"checkpoint.dir={root / 'ckpt'}"]})
        layouts = {f"{layout}_{mode}": [f"parallel.{layout[:2]}=2", "optimizer.zero_stage=1", *(
            SAMPLE + wandb[layout] + downstream_settings(data) + [f"checkpoint.dir={root / layout}"]
            if mode == "sampled" else [])] for layout in ("tp2", "pp2") for mode in ("sampled", "plain")}
        compiled = ["execution.compile=true", "optimizer.zero_stage=1"]
        layouts |= {"dp2_compiled_tasks": [*compiled, *downstream_settings(data, fewshot=2),
                                           f"checkpoint.dir={root / 'dp2'}"],
                    "dp2_compiled_plain": compiled}
        runs |= run_layouts(root, 2, generate_base(data), layouts)
    return {"runs": runs, "root": root}
