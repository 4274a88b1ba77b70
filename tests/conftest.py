"""Shared fixtures: running the package in fresh processes (plain, under torchrun, or as the
ranks of a job forked by tests/forkserver.py)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
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


_fork_server: subprocess.Popen | None = None  # ends when this process does (its stdin closes)


def launch(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`script ARGS` as the `nproc` ranks of one job, with torchrun's environment, forked by
    tests/forkserver.py (which imported the stack once); fails the test with every rank's output
    on error. With a CUDA device (which a forked child cannot use once its parent has looked for
    one) or PRETRAIN_TEST_LAUNCH=torchrun, the job runs under torchrun instead."""
    import torch

    if os.environ.get("PRETRAIN_TEST_LAUNCH") == "torchrun" or torch.cuda.is_available():
        return torchrun(nproc, script, *args, timeout=timeout)
    global _fork_server
    if _fork_server is None or _fork_server.poll() is not None:
        _fork_server = subprocess.Popen([sys.executable, str(TESTS / "forkserver.py")], cwd=ROOT, env=child_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with tempfile.TemporaryDirectory(prefix="launch-") as log_dir:
        request = {"nproc": nproc, "script": script, "args": list(args), "env": child_env(), "log_dir": log_dir,
                   "timeout": timeout}
        _fork_server.stdin.write(json.dumps(request) + "\n")
        _fork_server.stdin.flush()
        reply = _fork_server.stdout.readline()
        output = "".join(f"--- rank {rank} ---\n{(Path(log_dir) / f'rank{rank}.log').read_text()}"
                         for rank in range(nproc) if (Path(log_dir) / f"rank{rank}.log").exists())
    if not reply:
        pytest.fail(f"tests/forkserver.py ended (exit code {_fork_server.wait()}) running {script}\n{output[-8000:]}")
    result = json.loads(reply)
    codes = result["returncodes"]
    if any(codes) or result["timed_out"]:
        timed_out = f" (killed after {timeout} s)" if result["timed_out"] else ""
        pytest.fail(f"{script} {' '.join(args)}: ranks exited {codes}{timed_out}\n{output[-8000:]}")
    return subprocess.CompletedProcess([script, *args], 0, output, "")


def hf_check(specs: list[dict], tmp_path: Path) -> list[dict]:
    """tests/hf_check.py in one fresh process (transformers only): its results, one per spec."""
    spec, out = tmp_path / "hf-specs.json", tmp_path / "hf-results.pt"
    spec.write_text(json.dumps(specs))
    proc = subprocess.run([sys.executable, str(TESTS / "hf_check.py"), str(spec), str(out)], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import torch

    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def tp2_model_checks(tmp_path_factory) -> list[dict]:
    """model_checks.py at TP2 (one 2-process launch shared by test_model and test_plan): each rank's figures."""
    out = tmp_path_factory.mktemp("model-checks-tp2") / "checks.json"
    launch(2, str(TESTS / "model_checks.py"), str(out))
    return json.loads(out.read_text())


def run_layouts(tmp_path: Path, nproc: int, base: list[str], runs: dict[str, list[str]],
                config: str | None = None, split_check: list[str] | None = None) -> dict:
    """Train each named layout in one launch of `nproc` processes.
    Returns name -> {"loss": {step: value}, "grad_norm": {step: value}}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec, out = tmp_path / f"spec{nproc}.json", tmp_path / f"losses{nproc}.json"
    runs = {name: overrides + [f"log.dir={tmp_path / name}"] for name, overrides in runs.items()}
    extra = {"split_check": split_check} if split_check else {}
    spec.write_text(json.dumps({"config": config, "base": base, "runs": runs, **extra}))
    launch(nproc, str(TESTS / "dist_runs.py"), str(spec), str(out))
    results = json.loads(out.read_text())
    return {name: run if name == "split_check" else
            {metric: {int(step): value for step, value in series.items()} for metric, series in run.items()}
            for name, run in results.items()}
