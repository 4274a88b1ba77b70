"""Launchers: `pretrain launch local` (torchrun on this machine) and `pretrain launch slurm`
(renders slurm/train.sbatch for sbatch, optionally submitting it)."""

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"


def train_arguments(config: str | None, overrides: list[str]) -> list[str]:
    return (["--config", config] if config else []) + list(overrides)


def local_command(nproc: int | None, config: str | None, overrides: list[str]) -> list[str]:
    """torchrun with a standalone rendezvous: one process per GPU, or `nproc` CPU processes."""
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 1
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pretrain", "train", *train_arguments(config, overrides)]


def launch_local(nproc: int | None, config: str | None, overrides: list[str]) -> int:
    command = local_command(nproc, config, overrides)
    print("+ " + shlex.join(command), flush=True)
    return subprocess.run(command).returncode


@dataclass
class SlurmJob:
    nodes: int
    procs_per_node: int  # GPUs per node (or CPU processes with cpu=True)
    config: str | None
    overrides: list[str]
    cpu: bool = False
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "pretrain"
    log_dir: str = "runs/slurm"
    cpus_per_task: int | None = None
    max_restarts: int = 3
    signal_seconds: int = 120


def render_sbatch(job: SlurmJob, workdir: Path | None = None) -> str:
    """The sbatch script for `job`: the template with its {{FIELDS}} filled in."""
    workdir = (workdir or Path.cwd()).resolve()
    extra = [f"#SBATCH --{name}={value}" for name, value in
             (("partition", job.partition), ("time", job.time), ("account", job.account)) if value]
    fields = {
        "JOB_NAME": job.job_name,
        "NODES": str(job.nodes),
        "GPU_DIRECTIVE": "" if job.cpu else f"#SBATCH --gpus-per-node={job.procs_per_node}",
        "CPUS_PER_TASK": str(job.cpus_per_task or (job.procs_per_node if job.cpu else 8 * job.procs_per_node)),
        "LOG_DIR": str((workdir / job.log_dir).resolve()),
        "SIGNAL_SECONDS": str(job.signal_seconds),
        "WORKDIR": str(workdir),
        "EXTRA_DIRECTIVES": "\n".join(extra),
        "MAX_RESTARTS": str(job.max_restarts),
        "PYTHON": shlex.quote(sys.executable),
        "PRETRAIN_ARGS": shlex.join(train_arguments(job.config, job.overrides)),
        "PROCS_PER_NODE": str(job.procs_per_node),
    }
    script = TEMPLATE.read_text()
    for name, value in fields.items():
        script = script.replace("{{" + name + "}}", value)
    return script


def launch_slurm(job: SlurmJob, submit: bool) -> int:
    """Print the script, or with `submit` write it under the log folder, sbatch it and print the job id."""
    script = render_sbatch(job)
    if not submit:
        print(script, end="")
        return 0
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job.job_name}.sbatch"
    path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"pretrain: sbatch {path} failed: {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    print(proc.stdout.strip().split(";")[0])
    return 0

