"""A lease on a folder, so that two live processes never write one folder (a checkpoint.dir, a
command's output folder, pretrain.outputs): a small JSON file
naming its holder, taken by an exclusive create and kept alive by a heartbeat thread that
rewrites it every timeout/4 seconds. No flock and no PID file alone: it works across nodes and on
network file systems. A lease whose holder has died is taken over — at once when the holder is
provably gone (an earlier attempt of this very job under torchrun or Slurm, or a process of this
host that no longer exists), otherwise once its heartbeat is older than the timeout."""

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pretrain.errors import UserError

log = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseError(UserError):
    """The folder is held by another live process, or the lease was lost."""

    exit_code = 1


def _identity(run_id: str) -> dict:
    """Who this process is, and which attempt of which job."""
    env = os.environ
    return {"run_id": run_id, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "torchrun": env.get("TORCHELASTIC_RUN_ID", ""), "slurm_job": env.get("SLURM_JOB_ID", ""),
            "attempt": [int(env.get("SLURM_RESTART_COUNT", "0")), int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLease:
    """`what` names the folder and `advice` what to do in the refusal of a second live writer."""

    def __init__(self, folder: Path, run_id: str, timeout_s: float, what: str = "checkpoint folder",
                 advice: str = "Wait for it to end or stop it, or give this run another log.dir and checkpoint.dir"):
        self.path, self.timeout_s, self.what, self.advice = folder / LEASE, timeout_s, what, advice
        self.me = _identity(run_id)
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return {}  # being written: judged by its age below

    def _write(self) -> None:
        """Replace the lease with this process's record and a fresh heartbeat."""
        temp = self.path.with_name(f"{LEASE}.{self.me['token']}")
        temp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        os.replace(temp, self.path)

    def _age(self, holder: dict) -> float:
        if "heartbeat" in holder:
            return time.time() - holder["heartbeat"]
        return time.time() - self.path.stat().st_mtime

    def _gone(self, holder: dict) -> bool:
        """The holder has certainly stopped: an earlier attempt of this job, a dead process of this
        host, or a heartbeat older than the timeout."""
        same_job = holder.get("run_id") == self.me["run_id"] and any(
            holder.get(key) and holder.get(key) == self.me[key] for key in ("torchrun", "slurm_job"))
        if same_job and holder.get("attempt", [0, 0]) < self.me["attempt"]:
            return True
        if holder.get("host") == self.me["host"] and "pid" in holder and not _alive(holder["pid"]):
            return True
        return self._age(holder) > self.timeout_s

    def acquire(self) -> None:
        """Take the lease, waiting at most one timeout for a holder that may have died; raise
        LeaseError when a live process holds it."""
        deadline = time.time() + self.timeout_s + 1
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                self._write()
                break
            except FileExistsError:
                pass
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            if self._gone(holder):
                log.warning("taking over %s from %s", self.path, _describe(holder))
                self._write()
                break
            if time.time() > deadline:
                raise LeaseError(
                    f"{self.path.parent} is in use by a live run ({_describe(holder)}, heartbeat "
                    f"{self._age(holder):.0f} s ago): two processes must not write one {self.what}. {self.advice}")
            time.sleep(min(1.0, self.timeout_s / 8))
        self._thread = threading.Thread(target=self._heartbeat, name="folder-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            self.check()
            if self.lost:
                return
            try:
                self._write()
            except OSError as error:  # a full disk: try again at the next beat
                log.warning("could not renew %s: %s", self.path, error)

    def check(self) -> None:
        """Note whether the lease is still ours (`lost` says why not)."""
        holder = self._read()
        if holder is not None and holder != {} and holder.get("token") != self.me["token"]:
            self.lost = f"{self.path} was taken over by {_describe(holder)}"

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    return f"run {holder.get('run_id', '?')}, host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
