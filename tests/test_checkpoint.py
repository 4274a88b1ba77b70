"""Checkpoints: bitwise-exact resume after SIGKILL (also during a save), torn checkpoints,
stop signals, resume at another data-parallel size, and the NaN guard."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, launch, start, torchrun_command
from pretrain.checkpoint import MARKER, find_checkpoint, torn_reason
from pretrain.signals import EXIT_STOPPED

STEPS, GLOBAL_BATCH = 12, 8
BASE = [
    "--config", str(ROOT / "configs/tiny.yaml"), "data.source=synthetic", "model.vocab_size=300",
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_len=32", "optimizer.lr=3e-3", "schedule.warmup_steps=2",
    f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"train.global_batch_size={GLOBAL_BATCH}",
    "log.interval=1", "checkpoint.interval=2", "checkpoint.keep_last=0",
]


def arguments(tmp: Path, *extra: str) -> list[str]:
    return ["train", *BASE, f"log.dir={tmp / 'log'}", f"checkpoint.dir={tmp / 'ckpt'}", *extra]


def run(tmp: Path, nproc: int = 1, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Train as a job of `nproc` ranks (conftest.launch); fails unless it exits `expect`."""
    return launch(nproc, "-m", "pretrain", *arguments(tmp, *extra), expect=expect)


def records(tmp: Path) -> list[dict]:
    """metrics.jsonl records; a line cut off by a kill (or still being written) is left out."""
    path = tmp / "log" / "metrics.jsonl"
    result = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            result.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return result


def train_losses(tmp: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it (a step re-run after a resume is logged again)."""
    logged: dict[int, list[float]] = {}
    for record in records(tmp):
        if record["group"] == "train":
            logged.setdefault(record["step"], []).append(record["loss"])
    return logged


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """The training in one process, a checkpoint every 2 steps: its folder (log/, ckpt/)."""
    tmp = tmp_path_factory.mktemp("full")
    run(tmp)
    return tmp


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    losses = train_losses(uninterrupted_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {step: values[0] for step, values in losses.items()}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The same training with two data-parallel processes (ZeRO-1): its checkpoints, every 2 steps."""
    tmp = tmp_path_factory.mktemp("two")
    run(tmp, 2)
    return tmp / "ckpt"


def copy_checkpoints(source: Path, tmp: Path, *steps: int) -> Path:
    """tmp/ckpt with the given steps' checkpoints of `source`: what a run of the same training
    saving only at those steps would hold."""
    for step in steps:
        shutil.copytree(source / f"step_{step:08d}", tmp / "ckpt" / f"step_{step:08d}")
    return tmp / "ckpt"


def kill_at(tmp: Path, step: int, during_save: bool) -> None:
    """Start training and SIGKILL it once `step` is logged, or, with during_save, while a
    checkpoint is being written after that step."""
    job = start(1, "-m", "pretrain", *arguments(tmp))
    deadline = time.time() + 300
    while time.time() < deadline and job.running():
        logged = max((r["step"] for r in records(tmp) if r["group"] == "train"), default=0)
        saving = (tmp / "ckpt").is_dir() and any(p.name.endswith(".partial") for p in (tmp / "ckpt").iterdir())
        if logged >= step and (saving or not during_save):
            os.kill(job.pids[0], signal.SIGKILL)
            break
        time.sleep(0.0005)
    job.wait(expect=-signal.SIGKILL)


@pytest.mark.multiprocess
def test_sigkill_at_random_steps_resumes_bitwise(tmp_path, uninterrupted):
    rng = random.Random(11)
    kills = sorted(rng.sample(range(2, STEPS), 3))
    torn_seen = False
    for index, step in enumerate(kills):
        kill_at(tmp_path, step, during_save=index == 1)
        torn_seen |= any(p.name.endswith(".partial") for p in (tmp_path / "ckpt").iterdir())
    proc = run(tmp_path)  # resume=auto to the end
    assert "resumed from" in proc.stdout
    assert torn_seen, "no kill landed during a checkpoint save"
    logged = train_losses(tmp_path)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, values in logged.items():  # re-run steps included: every value bitwise equal
        assert all(value == uninterrupted[step] for value in values), (step, values, uninterrupted[step])
    consumed = {r["step"]: r["consumed_samples"] for r in records(tmp_path) if r["group"] == "train"}
    assert consumed == {step: step * GLOBAL_BATCH for step in range(1, STEPS + 1)}  # no sample twice or skipped


@pytest.mark.multiprocess
def test_torn_checkpoint_is_skipped_with_a_warning(tmp_path, uninterrupted, uninterrupted_run):
    ckpt = copy_checkpoints(uninterrupted_run / "ckpt", tmp_path, 4, 8, 12)  # as checkpoint.interval=4 saves
    newest = ckpt / "step_00000012"
    victim = next(p for p in newest.iterdir() if p.name.startswith("zero_pp_rank_0"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated after the save
    assert "has 100 bytes" in torn_reason(newest)
    assert find_checkpoint(ckpt, "auto") == ckpt / "step_00000008"
    (ckpt / "step_00000008" / MARKER).unlink()  # as if killed before the marker
    assert find_checkpoint(ckpt, "auto") == ckpt / "step_00000004"
    proc = run(tmp_path)
    output = proc.stdout + proc.stderr
    assert "skipping torn checkpoint" in output and "step_00000012: zero_pp_rank_0" in output
    assert "step_00000008: no complete.json" in output and "resumed from" in output
    logged = train_losses(tmp_path)
    assert sorted(logged) == list(range(5, STEPS + 1))
    assert all(logged[step][0] == uninterrupted[step] for step in logged)


@pytest.mark.multiprocess
def test_explicit_resume_path_must_be_complete(tmp_path):
    (tmp_path / "half").mkdir()
    proc = run(tmp_path, 1, f"checkpoint.resume={tmp_path / 'half'}", expect=1)
    assert f"checkpoint.resume={tmp_path / 'half'} cannot be loaded: no complete.json" in proc.stderr


@pytest.mark.multiprocess
def test_stop_signal_saves_at_an_agreed_step_and_resumes(tmp_path, uninterrupted):
    proc = subprocess.Popen(torchrun_command(2, "-m", "pretrain", *arguments(tmp_path)), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while not [r for r in records(tmp_path) if r["group"] == "train" and r["step"] >= 3]:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), signal.SIGUSR1)  # one rank only: the others must follow at the same step
    output, _ = proc.communicate(timeout=300)
    assert f"exitcode  : {EXIT_STOPPED}" in output or f"exit code {EXIT_STOPPED}" in output, output[-3000:]
    stopped = int(output.split("stopped after step ")[1].split()[0])
    assert 3 <= stopped < STEPS and (tmp_path / "ckpt" / f"step_{stopped:08d}" / MARKER).is_file()
    run(tmp_path, 2)
    logged = train_losses(tmp_path)
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert all(abs(values[-1] - uninterrupted[step]) <= 1e-5 for step, values in logged.items())


@pytest.mark.multiprocess
def test_single_process_sigterm_exit_code(tmp_path):
    job = start(1, "-m", "pretrain", *arguments(tmp_path, "train.max_steps=400"))
    while not records(tmp_path):
        time.sleep(0.01)
    os.kill(job.pids[0], signal.SIGTERM)
    proc = job.wait(expect=EXIT_STOPPED)
    assert "with a checkpoint saved" in proc.stdout + proc.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_data_parallel_size(tmp_path, uninterrupted, uninterrupted_run, two_processes, before,
                                               after):
    copy_checkpoints(uninterrupted_run / "ckpt" if before == 1 else two_processes, tmp_path, 6)
    run(tmp_path, after, "optimizer.zero_stage=1")
    assert (tmp_path / "ckpt" / "step_00000006.universal" / MARKER).is_file()
    logged = train_losses(tmp_path)
    assert sorted(logged) == list(range(7, STEPS + 1))
    difference = max(abs(logged[step][0] - uninterrupted[step]) for step in logged)
    print(f"DP {before} -> {after}: max |loss difference| {difference:.3g}")
    assert difference <= 1e-5


@pytest.mark.multiprocess
def test_resume_at_another_tensor_parallel_size_is_refused(tmp_path, two_processes):
    copy_checkpoints(two_processes, tmp_path, 2)
    proc = run(tmp_path, 2, "optimizer.zero_stage=1", "parallel.tp=2", expect=1)
    assert "was saved with parallel.tp=1 parallel.pp=1; this run has parallel.tp=2 parallel.pp=1" in proc.stderr
    assert "pretrain convert reshard --checkpoint" in proc.stderr


@pytest.mark.multiprocess
def test_nan_updates_are_skipped_counted_and_stop_the_run(tmp_path, uninterrupted):
    run(tmp_path, 1, "checkpoint.dir=''", "train.inject_nan_steps=[3]", "optimizer.zero_stage=1")
    rows = {r["step"]: r for r in records(tmp_path) if r["group"] == "train"}
    assert rows[3]["skipped_steps"] == 1 and rows[STEPS]["skipped_steps"] == 1
    assert rows[2]["loss"] == uninterrupted[2] and rows[4]["loss"] != rows[4]["loss"] * 2  # finite again
    proc = run(tmp_path / "again", 1, "checkpoint.dir=''", "train.inject_nan_steps=[4,5,6]", "train.max_bad_steps=3",
               "optimizer.zero_stage=1", expect=1)
    assert "3 updates in a row skipped for a non-finite loss (train.max_bad_steps=3) at step 6" in proc.stderr


def test_retention_keeps_the_newest_complete_and_every_kth(tmp_path):
    from pretrain.checkpoint import UNIVERSAL, prune

    for step in range(1, 11):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / MARKER).write_text(json.dumps({"files": {}}))
    (tmp_path / f"step_00000001{UNIVERSAL}").mkdir()
    (tmp_path / "step_00000011").mkdir()  # torn (no marker): neither counted nor removed
    prune(tmp_path, keep_last=3, keep_every=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000004", "step_00000008", "step_00000009", "step_00000010", "step_00000011"]
    assert find_checkpoint(tmp_path, "auto").name == "step_00000010"
    assert find_checkpoint(tmp_path, "none") is None


@pytest.mark.multiprocess
def test_nan_without_a_skipping_optimizer_stops_at_once(tmp_path):
    proc = run(tmp_path, 1, "checkpoint.dir=''", "train.inject_nan_steps=[2]", "optimizer.zero_stage=0", expect=1)
    assert "non-finite loss at step 2: with optimizer.zero_stage=0 and fp32 DeepSpeed cannot skip" in proc.stderr


def test_checkpoints_saved_while_deepspeed_clipped_still_resume(tmp_path):
    """Checkpoints from before pretrain.update.DeviceUpdate record DeepSpeed's clip norm, which
    DeepSpeed refuses to load into a ZeRO optimizer that measures no norm of its own."""
    from pretrain import parallel
    from pretrain.checkpointer import Progress
    from pretrain.config import load, validate
    from pretrain.data import stream
    from pretrain.train import Trainer

    config = load(BASE[1], BASE[2:] + [f"log.dir={tmp_path / 'log'}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                                       "train.max_steps=2", "optimizer.zero_stage=1"])
    for step in (2, 3):
        context = parallel.initialize(tp=1, pp=1, backend="gloo")
        try:
            trainer = Trainer(config, validate(config, 1), context, stream.resolve(config))
            if step == 2:
                trainer.run()
                trainer.engine.optimizer.clip_grad = 1.0  # as DeepSpeed's own clipping saved it
                trainer.checkpointer.save(trainer.engine, Progress(3, trainer.progress.tokens, trainer.progress.consumed_samples))
        finally:
            parallel.shutdown()
    assert trainer.start_step == 3
