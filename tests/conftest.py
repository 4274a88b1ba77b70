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


def torchrun(nproc: int, *args: str, cwd: Path = ROOT, expect: int = 0,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS` on a free local port; fails the test with its output
    unless it exits `expect`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


_fork_server: subprocess.Popen | None = None  # ends when this process does (its stdin closes)


def launch(nproc: int, *args: str, expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` (a script, or -m and a module) as the `nproc` ranks of one job, with torchrun's
    environment, forked by tests/forkserver.py (which imported the stack once); fails the test with
    every rank's output unless the job exits `expect` (its first non-zero rank's code). With a CUDA
    device (which a forked child cannot use once its parent has looked for one) or
    PRETRAIN_TEST_LAUNCH=torchrun, the job runs under torchrun instead."""
    import torch

    if os.environ.get("PRETRAIN_TEST_LAUNCH") == "torchrun" or torch.cuda.is_available():
        return torchrun(nproc, *args, expect=expect, timeout=timeout)
    global _fork_server
    if _fork_server is None or _fork_server.poll() is not None:
        _fork_server = subprocess.Popen([sys.executable, str(TESTS / "forkserver.py")], cwd=ROOT, env=child_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with tempfile.TemporaryDirectory(prefix="launch-") as log_dir:
        request = {"nproc": nproc, "script": args[0], "args": list(args[1:]), "env": child_env(), "log_dir": log_dir,
                   "timeout": timeout}
        _fork_server.stdin.write(json.dumps(request) + "\n")
        _fork_server.stdin.flush()
        reply = _fork_server.stdout.readline()
        logs = {(rank, kind): (Path(log_dir) / f"rank{rank}.{kind}").read_text(errors="replace")
                if (Path(log_dir) / f"rank{rank}.{kind}").exists() else "" for rank in range(nproc) for kind in ("out", "err")}
    output = "".join(f"--- rank {rank} {kind} ---\n{text}" for (rank, kind), text in logs.items())
    if not reply:
        pytest.fail(f"tests/forkserver.py ended (exit code {_fork_server.wait()}) running {args}\n{output[-8000:]}")
    result = json.loads(reply)
    returncode = next((code for code in result["returncodes"] if code), 0)
    if returncode != expect or result["timed_out"]:
        timed_out = f" (killed after {timeout} s)" if result["timed_out"] else ""
        pytest.fail(f"{' '.join(args)}: ranks exited {result['returncodes']}{timed_out}\n{output[-8000:]}")
    return subprocess.CompletedProcess(list(args), returncode, "".join(logs[rank, "out"] for rank in range(nproc)),
                                       "".join(logs[rank, "err"] for rank in range(nproc)))


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
