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
                config: str | None = None, split_check: list[str] | None = None, checks: str | None = None) -> dict:
    """Train each named layout in one launch of `nproc` processes (then, with `checks`, run that
    module's checks() in the same launch: its result is under "checks").
    Returns name -> {"loss": {step: value}, "grad_norm": {step: value}}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec, out = tmp_path / f"spec{nproc}.json", tmp_path / f"losses{nproc}.json"
    runs = {name: overrides + [f"log.dir={tmp_path / name}"] for name, overrides in runs.items()}
    extra = ({"split_check": split_check} if split_check else {}) | ({"checks": checks} if checks else {})
    spec.write_text(json.dumps({"config": config, "base": base, "runs": runs, **extra}))
    torchrun(nproc, str(TESTS / "dist_runs.py"), str(spec), str(out))
    results = json.loads(out.read_text())
    return {name: run if name in ("split_check", "checks") else
            {metric: {int(step): value for step, value in series.items()} for metric, series in run.items()}
            for name, run in results.items()}
