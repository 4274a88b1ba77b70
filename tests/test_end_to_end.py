"""`pretrain launch local` (torchrun -m pretrain train) with TP2: trains, loss falls, every
TensorBoard tag is written; the command it runs is printed first."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, child_env

TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_gpu",
        "train/step_time", "train/mem_peak_gib"]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny model at TP2 for 40 steps, one launch for both tests: its folder and output."""
    tmp = tmp_path_factory.mktemp("tp2")
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "launch", "local", "--nproc", "2", "--config",
         str(ROOT / "configs/tiny.yaml"), "parallel.tp=2", f"log.dir={tmp / 'log'}", "train.max_steps=40",
         "checkpoint.dir=" + str(tmp / "ckpt")],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


@pytest.mark.multiprocess
def test_torchrun_tp2_writes_every_tag_and_learns(tp2_run):
    tmp_path, proc = tp2_run
    log_dir = tmp_path / "log"
    assert "step 40/40" in proc.stdout + proc.stderr
    assert re.search(r"predicted memory per process: [\d.]+ GiB \(weights [\d.]+, gradients", proc.stdout)

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert set(TAGS) <= set(tags)
    assert "train/mfu" not in tags  # no GPU: MFU is left out rather than invented
    losses = [event.value for event in events.Scalars("train/loss")]
    assert [event.step for event in events.Scalars("train/loss")] == [10, 20, 30, 40]
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(event.value > 0 for tag in TAGS for event in events.Scalars(tag))

    resolved = (log_dir / "config.yaml").read_text()
    assert "tp: 2" in resolved and "max_steps: 40" in resolved
    assert (tmp_path / "ckpt" / "step_00000040").is_dir()


@pytest.mark.multiprocess
def test_launch_local_prints_and_runs_torchrun(tp2_run):
    _, proc = tp2_run
    first = proc.stdout.splitlines()[0]
    assert first.startswith("+ ") and ("torch.distributed.run --standalone --nproc_per_node 2 --max-restarts 3 "
                                       "-m pretrain train") in first  # train.max_restarts
    assert "step 40/40" in proc.stdout + proc.stderr


def test_slurm_script_renders_every_field():
    import re

    from pretrain.launch import SlurmJob, render_sbatch

    script = render_sbatch(SlurmJob(nodes=4, procs_per_node=8, config="configs/llama-7b.yaml",
                                    overrides=["train.max_steps=10"], partition="gpu", time="1-00:00:00",
                                    account="lab"))
    assert not re.search(r"\{\{[A-Z_]+\}\}", script)  # every field filled in
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --account=lab", "#SBATCH --signal=B:USR1@120",
                 "PRETRAIN_ARGS=(--config configs/llama-7b.yaml train.max_steps=10)", "MAX_RESTARTS=3",
                 "MAX_REQUEUES=3", "MAX_FAILURES=2", '--max-restarts "$4"'):
        assert line in script
