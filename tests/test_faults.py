"""Hard faults, with real processes: a stopped (hung) rank under `pretrain launch local` is found
by the watchdog and torchrun restarts the workers, which finish with the uninterrupted run's
losses; a full disk during a save (a real tmpfs) leaves the previous checkpoint, which resumes
exactly, and the error names the path. (A killed rank on two Slurm nodes: tests/test_slurm.py.)"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, launch
from pretrain.checkpoint import find_checkpoint, torn_reason
from pretrain.watchdog import EXIT_HUNG
from test_checkpoint import BASE, train_losses

pytestmark = pytest.mark.multiprocess

HANG_TIMEOUT_S = 6
LONG = ["train.max_steps=160", "log.interval=10", "checkpoint.interval=40", "checkpoint.keep_last=2",
        f"train.hang_timeout_s={HANG_TIMEOUT_S}"]


def training_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the training processes whose command line contains `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue
        if marker.encode() in b" ".join(cmdline) and b"torch.distributed.run" not in cmdline and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def final_losses(tmp: Path) -> dict[int, float]:
    return {step: values[-1] for step, values in train_losses(tmp).items()}


def test_a_stopped_rank_is_detected_and_the_workers_restart_to_the_same_losses(tmp_path):
    """Once the watchdog has ended rank 0, the stopped rank is continued (a stall that passes): it
    then ends on its own, so torchrun need not wait 30 s to SIGKILL it before the restart."""
    plain, faulty = tmp_path / "plain", tmp_path / "faulty"
    launch(2, "-m", "pretrain", "train", *BASE, *LONG, f"log.dir={plain / 'log'}", "checkpoint.dir=''")  # uninterrupted
    command = [sys.executable, "-m", "pretrain", "launch", "local", "--nproc", "2", "--max-restarts", "1", *BASE, *LONG]
    output = tmp_path / "output.txt"
    with open(output, "w") as sink:
        proc = subprocess.Popen([*command, f"log.dir={faulty / 'log'}", f"checkpoint.dir={faulty / 'ckpt'}"],
                                cwd=ROOT, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (faulty / "ckpt" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)
    pids = training_pids(str(faulty / "log"))
    os.kill(pids[1], signal.SIGSTOP)
    stopped, seen = time.monotonic(), {}
    while proc.poll() is None:
        text = output.read_text()
        for event, line in (("detected", "hung: nothing finished for"), ("restarted", "restart 1 of at most 1")):
            if line in text and event not in seen:
                seen[event] = time.monotonic() - stopped
        if "detected" in seen and "continued" not in seen and not running(pids[0]):
            os.kill(pids[1], signal.SIGCONT)
            seen["continued"] = time.monotonic() - stopped
        assert time.monotonic() - stopped < 240, text[-3000:]
        time.sleep(0.1)
    text = output.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"exits with {EXIT_HUNG} so that torchrun restarts the workers" in text and "Thread 0x" in text  # stacks
    assert seen["detected"] < HANG_TIMEOUT_S + 12, seen
    print(f"stopped rank: detected after {seen['detected']:.1f} s, continued after {seen['continued']:.1f} s, "
          f"workers restarted after {seen['restarted']:.1f} s")
    assert final_losses(faulty) == final_losses(plain)


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def small_disk(tmp_path):
    """mount(bytes) -> a real tmpfs of that size (needs root, as the Slurm fixture does)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size: int) -> Path:
        path = tmp_path / "disk"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_disk):
    def train(ckpt: Path, log: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
        return launch(2, "-m", "pretrain", "train", *BASE, f"log.dir={log}", f"checkpoint.dir={ckpt}", *extra,
                      expect=expect)

    train(tmp_path / "ref-ckpt", tmp_path / "ref" / "log", "checkpoint.interval=4")
    size = sum(p.stat().st_size for p in (tmp_path / "ref-ckpt" / "step_00000004").rglob("*") if p.is_file())
    disk = small_disk(int(1.5 * size))  # room for one checkpoint, not two
    full = train(disk, tmp_path / "full" / "log", "checkpoint.interval=4", expect=1)
    assert f"saving {disk / 'step_00000008.partial'} failed on rank(s)" in full.stderr
    assert f"0.00 GiB free on {disk}" in full.stderr
    assert f"{disk / 'step_00000004'} is the newest complete checkpoint" in full.stderr
    assert sorted(p.name for p in disk.glob("step_*")) == ["step_00000004"]  # the partial one removed
    assert (disk / "latest").read_text().strip() == "step_00000004"
    assert torn_reason(disk / "step_00000004") is None
    shutil.copytree(disk, tmp_path / "moved")  # the user frees space: checkpoint.dir elsewhere
    assert find_checkpoint(tmp_path / "moved", "auto").name == "step_00000004"
    resumed = train(tmp_path / "moved", tmp_path / "full" / "log", "checkpoint.interval=0")
    assert "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert final_losses(tmp_path / "full") == final_losses(tmp_path / "ref")
