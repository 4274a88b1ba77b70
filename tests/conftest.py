"""Shared fixtures: running the package in fresh processes (plain, under torchrun, or as the
ranks of a job forked by tests/forkserver.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node N ARGS` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def torchrun(nproc: int, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS`; fails the test with its output on error."""
    command = torchrun_command(nproc, *args)
    proc = subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def start(nproc: int, *args: str, timeout: int = 600) -> "ForkedJob | TorchrunJob":
    """Start `python ARGS` (a script, or -m and a module) as the `nproc` ranks of one job with
    torchrun's environment, forked by tests/forkserver.py, which imported the stack once (~5 s of
    CPU a process saved). With a CUDA device (which a forked child cannot use once its parent has
    looked for one) or PRETRAIN_TEST_LAUNCH=torchrun, the job runs under torchrun instead (one
    rank: a plain process). One forked job runs at a time: wait() for it before starting
    another (a job that a failed test left running is killed)."""
    import torch

    if os.environ.get("PRETRAIN_TEST_LAUNCH") == "torchrun" or torch.cuda.is_available():
        return TorchrunJob(nproc, args, timeout)
    return ForkedJob(nproc, args, timeout)


def launch(nproc: int, *args: str, expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`start` the job and wait for it: fails the test with every rank's output unless the job
    exits `expect` (the status of the rank that failed first)."""
    return start(nproc, *args, timeout=timeout).wait(expect)


def check_exit(args: tuple, returncode: int, expect: int, output: str) -> None:
    if returncode != expect:
        pytest.fail(f"{' '.join(args)} exited {returncode}, not {expect}\n{output[-8000:]}")


class ForkedJob:
    server: subprocess.Popen | None = None  # tests/forkserver.py, started by the first job
    running_job: "ForkedJob | None" = None  # the server runs one job at a time

    def __init__(self, nproc: int, args: tuple, timeout: int):
        if ForkedJob.server is None or ForkedJob.server.poll() is not None:
            ForkedJob.server = subprocess.Popen([sys.executable, str(TESTS / "forkserver.py")], cwd=ROOT,
                                                env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                text=True)
        if ForkedJob.running_job is not None:  # left by a test that failed before waiting for it
            ForkedJob.running_job.kill()
        ForkedJob.running_job = self
        self.nproc, self.args, self.timeout = nproc, args, timeout
        self.log_dir = Path(tempfile.mkdtemp(prefix="launch-"))
        request = {"nproc": nproc, "script": args[0], "args": list(args[1:]), "env": child_env(),
                   "log_dir": str(self.log_dir), "timeout": timeout}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        self.pids = self._reply()["pids"]

    def running(self) -> bool:
        """Whether every rank still runs (the server reaps an ended one at once)."""
        try:
            for pid in self.pids:
                os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def _reply(self) -> dict:
        line = self.server.stdout.readline()
        if not line:
            pytest.fail(f"tests/forkserver.py ended (exit code {self.server.wait()}) running {self.args}")
        return json.loads(line)

    def kill(self) -> None:
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reply()
        ForkedJob.running_job = None

    def wait(self, expect: int = 0) -> subprocess.CompletedProcess:
        result = self._reply()
        ForkedJob.running_job = None
        logs = {(rank, kind): path.read_text(errors="replace") if (path := self.log_dir / f"rank{rank}.{kind}").exists()
                else "" for rank in range(self.nproc) for kind in ("out", "err")}
        shutil.rmtree(self.log_dir)
        output = "".join(f"--- rank {rank} {kind} ---\n{text}" for (rank, kind), text in logs.items())
        if result["timed_out"]:
            pytest.fail(f"{' '.join(self.args)}: killed after {self.timeout} s\n{output[-8000:]}")
        returncode = result["first_failure"]
        check_exit(self.args, returncode, expect, f"ranks exited {result['returncodes']}\n{output}")
        return subprocess.CompletedProcess(list(self.args), returncode,
                                           "".join(logs[rank, "out"] for rank in range(self.nproc)),
                                           "".join(logs[rank, "err"] for rank in range(self.nproc)))


def pytest_sessionfinish(session) -> None:
    """The fork server ends with the session (it also would when this process ends: its stdin closes)."""
    if ForkedJob.server is not None:
        ForkedJob.server.stdin.close()
        ForkedJob.server.wait(timeout=60)


class TorchrunJob:
    def __init__(self, nproc: int, args: tuple, timeout: int):
        self.nproc, self.args, self.timeout = nproc, args, timeout
        command = [sys.executable, *args] if nproc == 1 else torchrun_command(nproc, *args)
        self.proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    @property
    def pids(self) -> list[int]:
        """This process, or torchrun's workers (its children) once they have started."""
        if self.nproc == 1:
            return [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while len(pids := children.read_text().split()) < self.nproc:
            assert self.running(), f"torchrun ended before its {self.nproc} workers were seen"
            time.sleep(0.05)
        return [int(pid) for pid in pids]

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, expect: int = 0) -> subprocess.CompletedProcess:
        stdout, stderr = self.proc.communicate(timeout=self.timeout)
        check_exit(self.args, self.proc.returncode, expect, f"{stdout[-4000:]}\n{stderr}")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)


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
                config: str | None = None, split_check: list[str] | None = None, checks: str | None = None) -> dict:
    """Train each named layout in one launch of `nproc` processes (then, with `checks`, run that
    module's checks() in the same launch: its result is under "checks").
    Returns name -> {"loss": {step: value}, "grad_norm": {step: value}}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec, out = tmp_path / f"spec{nproc}.json", tmp_path / f"losses{nproc}.json"
    runs = {name: overrides + [f"log.dir={tmp_path / name}"] for name, overrides in runs.items()}
    extra = ({"split_check": split_check} if split_check else {}) | ({"checks": checks} if checks else {})
    spec.write_text(json.dumps({"config": config, "base": base, "runs": runs, **extra}))
    launch(nproc, str(TESTS / "dist_runs.py"), str(spec), str(out))
    results = json.loads(out.read_text())
    return {name: run if name in ("split_check", "checks") else
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
