"""A sweep on disk and its launchers. SWEEP/sweep.json lists the points; each point has a folder
SWEEP/points/<name>/ with config.yaml, log/ (metrics.jsonl), checkpoints/ and, once its run has
completed, result.json (its final loss: the last validation loss, else the last training
loss). A point with a result.json is finished and every launcher skips it; one without resumes
from its newest checkpoint (checkpoint.resume=auto), so a requeued or rerun point continues."""

import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from pretrain.signals import EXIT_STOPPED
from pretrain.config import load
from pretrain.launch import (RESTART_SAFE_ENV, SLURM_DIR, fill_template, local_command, script_path, slurm_fields,
                             submit_sbatch, write_scripts)
from pretrain.scaling import ScalingError

MANIFEST = "sweep.json"
RESULT = "result.json"
VERSION = 1


class Sweep:
    def __init__(self, root: Path, data: dict):
        self.root, self.data = root, data

    @staticmethod
    def exists(root: Path) -> bool:
        return (root / MANIFEST).exists()

    @classmethod
    def create(cls, root: Path, data: dict) -> "Sweep":
        root.mkdir(parents=True, exist_ok=True)
        data = {"version": VERSION, **data}
        (root / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
        return cls(root, data)

    @classmethod
    def load(cls, location: str | Path) -> "Sweep":
        """A sweep folder or its sweep.json."""
        path = Path(location)
        path = path if path.name == MANIFEST else path / MANIFEST
        if not path.is_file():
            raise ScalingError(f"no {MANIFEST} at {path}: plan a sweep first with "
                               f"`pretrain scaling plan --base-config ... --compute ... --out {path.parent}`")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise ScalingError(f"{path} is not valid JSON ({error}): plan the sweep again") from None
        if data.get("version") != VERSION:
            raise ScalingError(f"{path} is not a sweep manifest of version {VERSION}: plan the sweep again")
        return cls(path.parent.resolve(), data)

    @property
    def points(self) -> list[dict]:
        return self.data["points"]

    def point(self, index: int) -> dict:
        if not 0 <= index < len(self.points):
            raise ScalingError(f"{self.root} has points 0..{len(self.points) - 1}, not {index}")
        return self.points[index]

    def folder(self, point: dict) -> Path:
        return self.root / "points" / point["name"]

    def config_path(self, point: dict) -> Path:
        return self.folder(point) / "config.yaml"

    def result(self, point: dict) -> dict | None:
        path = self.folder(point) / RESULT
        return json.loads(path.read_text()) if path.exists() else None

    def unfinished(self) -> list[dict]:
        return [p for p in self.points if self.result(p) is None]


def final_loss(log_dir: Path, steps: int) -> dict:
    """The run's last validation loss, else its loss at its last step, from metrics.jsonl."""
    path = log_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for group in ("valid", "train"):
        last = [r for r in records if r.get("group") == group and r.get("step") == steps]
        if last:
            return {"loss": last[-1]["loss"], "loss_from": group, "step": steps}
    raise ScalingError(f"{path} has no loss at the run's last step {steps}: the run did not complete")


def finish(sweep: Sweep, point: dict) -> dict:
    """Write the point's result.json (what makes it finished)."""
    config = load(sweep.config_path(point))
    result = {**final_loss(Path(config.log.dir), point["steps"]),
              **{k: point[k] for k in ("compute", "params", "params_all", "params_non_embedding", "tokens")}}
    (sweep.folder(point) / RESULT).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _train(config_path: Path, nproc: int) -> int:
    """Train a point in this process (nproc 1) or under torchrun; EXIT_STOPPED after a stop
    signal (SIGUSR1, SIGTERM), with a checkpoint saved."""
    config = load(config_path)
    if nproc == 1:
        from pretrain.train import train

        return EXIT_STOPPED if train(config).stopped_by_signal else 0
    # torchrun ignores USR1 (the default action would kill it); its workers get it from here, save
    # and end (with exit code 0 under a torchrun that may restart them), and torchrun with them
    child = subprocess.Popen(local_command(nproc, str(config_path), [], config.train.max_restarts),
                             env={**os.environ, **RESTART_SAFE_ENV},
                             preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    stopped = []

    def forward(signum, _frame) -> None:
        stopped.append(signum)
        subprocess.run(["pkill", "-USR1", "-P", str(child.pid)])

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_STOPPED if stopped and code == 0 else code


def run_point(sweep: Sweep, point: dict, nproc: int = 1) -> int:
    """Train one point unless it has finished, then record its result; the training's exit code."""
    if sweep.result(point) is not None:
        print(f"point {point['index']} ({point['name']}) has finished: skipped", flush=True)
        return 0
    print(f"point {point['index']} ({point['name']}): N={point['params']:,} on {point['tokens']:,} tokens, "
          f"{point['steps']} steps", flush=True)
    code = _train(sweep.config_path(point), nproc)
    if code == 0:
        result = finish(sweep, point)
        print(f"point {point['index']} finished: {result['loss_from']} loss {result['loss']:.4f}", flush=True)
    return code


@contextlib.contextmanager
def _output_to(path: Path):
    """This process's stdout and stderr (file descriptors 1 and 2) appended to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _start_worker(threads: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


def _run_logged(root: str, index: int, nproc: int) -> int:
    """A local worker's task: one point, its output in its folder's train.log."""
    sweep = Sweep.load(root)
    point = sweep.point(index)
    sweep.folder(point).mkdir(parents=True, exist_ok=True)
    with _output_to(sweep.folder(point) / "train.log"):
        try:
            return run_point(sweep, point, nproc)
        except Exception:  # reported by the launcher; the other points go on
            traceback.print_exc()
            return 1


def launch_local(sweep: Sweep, parallel: int = 1, nproc: int = 1) -> int:
    """Train the unfinished points on this machine, `parallel` at a time (worker processes that
    each train point after point), each with `nproc` processes."""
    todo = sweep.unfinished()
    if not todo:
        print(f"all {len(sweep.points)} points of {sweep.root} have finished")
        return 0
    print(f"{len(todo)} of {len(sweep.points)} points to train, {parallel} at a time (finished ones skipped); "
          f"each point's output goes to {sweep.root}/points/<name>/train.log", flush=True)
    threads = max(1, (os.cpu_count() or 1) // (parallel * nproc))
    failed = []
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_logged, str(sweep.root), p["index"], nproc): p for p in todo}
        for future in as_completed(futures):
            point = futures[future]
            result = sweep.result(point)
            if future.result() == 0 and result is not None:
                print(f"point {point['index']} ({point['name']}): {result['loss_from']} loss {result['loss']:.4f}",
                      flush=True)
            else:
                failed.append(point)
                print(f"point {point['index']} ({point['name']}) failed: see {sweep.folder(point) / 'train.log'}",
                      flush=True)
    if failed:
        print(f"pretrain: {len(failed)} point(s) failed: {', '.join(p['name'] for p in failed)}; fix the cause and "
              "launch again (finished points are skipped, the others resume from their checkpoints)", file=sys.stderr)
        return 1
    return 0


@dataclass
class SweepJob:
    """A Slurm job array over a sweep's unfinished points: task i trains point i."""

    nproc: int = 1  # GPUs (or with cpu=True, processes) per point
    cpu: bool = False
    parallel: int | None = None  # array tasks running at once (Slurm's %N throttle); None: no limit
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "pretrain-scaling"
    log_dir: str | None = None  # default SWEEP/slurm
    cpus_per_task: int | None = None
    max_requeues: int = 3  # requeues of a task after a stop signal
    signal_seconds: int = 120


def render_sbatch(sweep: Sweep, job: SweepJob, indices: list[int], workdir: Path | None = None) -> str:
    workdir = (workdir or Path.cwd()).resolve()
    log_dir = workdir / job.log_dir if job.log_dir else sweep.root / "slurm"
    fields = {
        **slurm_fields(job.job_name, job.partition, job.time, job.account, log_dir, workdir),
        "ARRAY": ",".join(map(str, indices)) + (f"%{job.parallel}" if job.parallel else ""),
        "GPU_DIRECTIVE": "" if job.cpu else f"#SBATCH --gpus-per-task={job.nproc}",
        "CPUS_PER_TASK": str(job.cpus_per_task or (job.nproc if job.cpu else 8 * job.nproc)),
        "SIGNAL_SECONDS": str(job.signal_seconds),
        "MAX_REQUEUES": str(job.max_requeues),
        "PYTHON": shlex.quote(sys.executable),
        "SWEEP": shlex.quote(script_path("the sweep folder", str(sweep.root))),
        "NPROC": str(job.nproc),
    }
    return fill_template(SLURM_DIR / "scaling.sbatch", fields)


def launch_slurm(sweep: Sweep, job: SweepJob, submit: bool) -> int:
    """Print the array's script, or with `submit` write it to the log folder and sbatch it."""
    todo = [p["index"] for p in sweep.unfinished()]
    if not todo:
        print(f"all {len(sweep.points)} points of {sweep.root} have finished: nothing to submit")
        return 0
    script = render_sbatch(sweep, job, todo)
    if not submit:
        print(script, end="")
        return 0
    log_dir = job.log_dir or str(sweep.root / "slurm")
    [path] = write_scripts(log_dir, {f"{job.job_name}.sbatch": script})
    job_id = submit_sbatch(path)
    if job_id is None:
        return 1
    print(job_id)
    return 0
