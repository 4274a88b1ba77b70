"""Launchers: `pretrain launch local` (torchrun on this machine), `pretrain launch slurm`
(renders slurm/train.sbatch for sbatch, optionally submitting it) and `pretrain launch
slurm-data` (slurm/data-build.sbatch, a job array building shards in parts, and
slurm/data-merge.sbatch, the merge that waits for it)."""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.data.shards import PACKING_UNIT_MB
from pretrain.errors import UserError

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
# Restarted workers must not share torchrun's rendezvous store: keys of the failed attempt
# left there send the new process group to dead peers (pytorch/pytorch#135712).
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TEMPLATE = SLURM_DIR / "train.sbatch"
# What sbatch takes for each setting put into a #SBATCH line (ASCII), and how to say it.
SLURM_SETTINGS = {
    "--job-name": (r"[\w.+@:=-]+", "a job name of letters, digits and . _ - + @ : ="),
    "--partition": (r"[\w.-]+(,[\w.-]+)*", "partition names of letters, digits and . _ -, separated by commas"),
    "--account": (r"[\w.-]+", "an account name of letters, digits and . _ -"),
    "--time": (r"(\d+-)?\d+(:\d+){0,2}|infinite|unlimited",
               "a time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 2-00:00:00)"),
}


class SlurmError(UserError, ValueError):
    """A setting or path that cannot go into an sbatch script; the message names it."""


def train_arguments(config: str | None, overrides: list[str]) -> list[str]:
    return (["--config", config] if config else []) + list(overrides)


def configured_restarts(config: str | None, overrides: list[str]) -> int:
    """train.max_restarts of the config the job will train with."""
    from pretrain.config import load

    return load(config, overrides).train.max_restarts


def local_command(nproc: int | None, config: str | None, overrides: list[str], max_restarts: int) -> list[str]:
    """torchrun with a standalone rendezvous: one process per GPU, or `nproc` CPU processes; when a
    worker fails, all are restarted (at most `max_restarts` times) and resume from the newest
    complete checkpoint."""
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 1
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "pretrain", "train", *train_arguments(config, overrides)]


def launch_local(nproc: int | None, config: str | None, overrides: list[str], max_restarts: int | None = None) -> int:
    if max_restarts is None:
        max_restarts = configured_restarts(config, overrides)
    command = local_command(nproc, config, overrides, max_restarts)
    print("+ " + shlex.join(command), flush=True)
    return subprocess.run(command, env={**os.environ, **RESTART_SAFE_ENV}).returncode


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
    max_restarts: int | None = None  # torchrun restarts in the job (None: the config's train.max_restarts)
    max_requeues: int = 3  # requeues after a stop signal (time limit, preemption)
    max_failures: int = 2  # requeues after training failed (a node lost, torchrun's restarts used up)
    signal_seconds: int = 120


def render_sbatch(job: SlurmJob, workdir: Path | None = None) -> str:
    """The sbatch script for `job`: the template with its {{FIELDS}} filled in."""
    workdir = (workdir or Path.cwd()).resolve()
    fields = {
        **slurm_fields(job.job_name, job.partition, job.time, job.account, workdir / job.log_dir, workdir),
        "NODES": str(job.nodes),
        "GPU_DIRECTIVE": "" if job.cpu else f"#SBATCH --gpus-per-node={job.procs_per_node}",
        "CPUS_PER_TASK": str(job.cpus_per_task or (job.procs_per_node if job.cpu else 8 * job.procs_per_node)),
        "SIGNAL_SECONDS": str(job.signal_seconds),
        "MAX_RESTARTS": str(configured_restarts(job.config, job.overrides) if job.max_restarts is None
                            else job.max_restarts),
        "MAX_REQUEUES": str(job.max_requeues),
        "MAX_FAILURES": str(job.max_failures),
        "PYTHON": shlex.quote(sys.executable),
        "PRETRAIN_ARGS": shlex.join(train_arguments(job.config, job.overrides)),
        "PROCS_PER_NODE": str(job.procs_per_node),
    }
    return fill_template(TEMPLATE, fields)


def slurm_fields(job_name: str, partition: str | None, time: str | None, account: str | None, log_dir: Path,
                 workdir: Path) -> dict[str, str]:
    """The fields all templates share, checked and quoted: JOB_NAME, EXTRA_DIRECTIVES (partition,
    time, account), SBATCH_LOG_DIR and WORKDIR for #SBATCH lines, LOG_DIR for the shell."""
    settings = {"--job-name": job_name, "--partition": partition, "--time": time, "--account": account}
    for option, value in settings.items():
        pattern, rule = SLURM_SETTINGS[option]
        if value and not re.fullmatch(pattern, value, re.ASCII | re.IGNORECASE):
            raise SlurmError(f"{option} {value!r} cannot go into an sbatch script: use {rule}")
    log_dir = script_path("--log-dir", str(log_dir.resolve()))
    return {
        "JOB_NAME": job_name,
        "EXTRA_DIRECTIVES": "\n".join(f"#SBATCH {option}={value}" for option, value in settings.items()
                                       if value and option != "--job-name"),
        "SBATCH_LOG_DIR": _sbatch_word(log_dir.replace("%", "%%")),  # --output expands %j and the like
        "LOG_DIR": shlex.quote(log_dir),
        "WORKDIR": _sbatch_word(script_path("the current folder", str(workdir))),
    }


def script_path(option: str, path: str) -> str:
    """`path`, refused when it holds a line break or another control character: sbatch reads its
    options line by line, and the scripts name paths in comments."""
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise SlurmError(f"{option} {path!r} holds a line break or control character, which an sbatch script "
                         "cannot hold: choose a folder without one")
    return path


def _sbatch_word(value: str) -> str:
    """`value` as one word of a #SBATCH line: sbatch's own quoting (double quotes; backslash before
    \\, " and #, which starts a comment there), where needed."""
    if re.fullmatch(r"[\w@%+=:,./-]+", value, re.ASCII):
        return value
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def fill_template(template: Path, fields: dict[str, str]) -> str:
    """A script of slurm/: `template` with each {{name}} replaced by its (already quoted) field."""
    script = template.read_text()
    for name, value in fields.items():
        script = script.replace("{{" + name + "}}", value)
    return script


def submit_sbatch(path: Path, *options: str) -> str | None:
    """sbatch a written script; its job id, or None (after saying why)."""
    proc = subprocess.run(["sbatch", "--parsable", *options, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"pretrain: sbatch {path} failed: {proc.stderr.strip()}", file=sys.stderr)
        return None
    return proc.stdout.strip().split(";")[0]


def write_scripts(log_dir: str, scripts: dict[str, str]) -> list[Path]:
    """Write each named script under `log_dir` (created if needed); their paths."""
    folder = Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in scripts]
    for path, script in zip(paths, scripts.values()):
        path.write_text(script)
    return paths


def launch_slurm(job: SlurmJob, submit: bool) -> int:
    """Print the script, or with `submit` write it under the log folder, sbatch it and print the job id."""
    script = render_sbatch(job)
    if not submit:
        print(script, end="")
        return 0
    [path] = write_scripts(job.log_dir, {f"{job.job_name}.sbatch": script})
    job_id = submit_sbatch(path)
    if job_id is None:
        return 1
    print(job_id)
    return 0


@dataclass
class DataJob:
    """`pretrain data build` in `parts` array tasks, then `pretrain data merge` into `out`."""

    parts: int
    inputs: list[str]
    tokenizer: str
    seq_len: int
    out: str
    workers: int = 16
    shard_samples: int = 10_000
    text_field: str = "text"
    unit_mb: float = PACKING_UNIT_MB
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "pretrain-data"
    log_dir: str = "runs/slurm"


def render_data_sbatch(job: DataJob, workdir: Path | None = None) -> tuple[str, str]:
    """The build array's script and the merge's, paths made absolute against `workdir`."""
    workdir = (workdir or Path.cwd()).resolve()

    def absolute(path: str) -> str:
        return str(workdir / path) if "*" in path or "?" in path else str((workdir / path).resolve())

    build = ["--input", *map(absolute, job.inputs), "--tokenizer", absolute(job.tokenizer), "--seq-len", str(job.seq_len),
             "--workers", str(job.workers), "--shard-samples", str(job.shard_samples), "--text-field", job.text_field,
             "--unit-mb", str(job.unit_mb)]
    fields = {
        **slurm_fields(job.job_name, job.partition, job.time, job.account, workdir / job.log_dir, workdir),
        "MERGE_JOB_NAME": f"{job.job_name}-merge", "PARTS": str(job.parts), "LAST_PART": str(job.parts - 1),
        "CPUS_PER_TASK": str(job.workers + 1), "PYTHON": shlex.quote(sys.executable), "BUILD_ARGS": shlex.join(build),
        "OUT": shlex.quote(script_path("--out", absolute(job.out))),
    }
    return (fill_template(SLURM_DIR / "data-build.sbatch", fields),
            fill_template(SLURM_DIR / "data-merge.sbatch", fields))


def launch_slurm_data(job: DataJob, submit: bool) -> int:
    """Print both scripts, or with `submit` sbatch the array and the merge (afterok) and print their ids."""
    if job.parts < 1:
        raise SlurmError(f"--parts {job.parts}: the array needs at least 1 task")
    build, merge = render_data_sbatch(job)
    if not submit:
        print(build, end="")
        print("\n# ---- then, with --dependency=afterok:<the array's job id>:\n")
        print(merge, end="")
        return 0
    build_path, merge_path = write_scripts(job.log_dir, {f"{job.job_name}-build.sbatch": build,
                                                          f"{job.job_name}-merge.sbatch": merge})
    array = submit_sbatch(build_path)
    merged = array and submit_sbatch(merge_path, f"--dependency=afterok:{array}")
    if not merged:
        return 1
    print(f"{array} {merged}")
    return 0

