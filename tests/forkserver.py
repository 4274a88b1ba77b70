"""Starts multi-process jobs fast: imports torch, DeepSpeed, megatron-core and pretrain once,
then forks each job's ranks from this process, with the environment torchrun gives its workers
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT). Importing
the stack costs ~5 s of CPU per process, which on 2 cores made a launch of 8 processes ~25 s.

Protocol (conftest.start): one JSON request per line on stdin, {"nproc", "script", "args",
"env", "log_dir", "timeout"}; each rank runs `script` (or, when it is "-m", the module args[0])
as __main__, its output in log_dir/rank{N}.out and .err. Two replies, one JSON line each:
{"pids": [...]} once the ranks are forked; {"returncodes": [...], "first_failure": the status of
the rank that failed first (0 if none), "timed_out": bool} once they have ended. Once a rank
fails, the others get 10 s to end (a peer of a dead rank fails at its next collective) before
they are killed, as torchrun's agent would stop them."""

import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback

PROTOCOL = os.fdopen(os.dup(1), "w")  # replies; what the imports below print goes to stderr
os.dup2(2, 1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pretrain.train  # noqa: E402,F401 (torch, DeepSpeed, megatron-core: what every rank needs)

GRACE_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(request: dict, rank: int, port: int) -> None:
    """In the forked child: become rank `rank` of the job and run the script; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: killing it ends its DataLoader and compile workers too
        os.close(PROTOCOL.fileno())  # the replies are the server's alone
        for fd, suffix in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(request["log_dir"], f"rank{rank}.{suffix}"), os.O_WRONLY | os.O_CREAT), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.clear()
        os.environ.update(request["env"], RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
                          WORLD_SIZE=str(request["nproc"]), LOCAL_WORLD_SIZE=str(request["nproc"]),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if request["script"] == "-m":
            sys.argv = request["args"]  # argv[0] is then the module's name, as argparse needs no more
            runpy.run_module(request["args"][0], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [request["script"], *request["args"]]
            runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_job(request: dict) -> dict:
    port, ranks = free_port(), {}
    for rank in range(request["nproc"]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_rank(request, rank, port)
        try:
            os.setpgid(pid, pid)  # as the child does: whichever runs first
        except OSError:  # the child already has (or has already ended)
            pass
        ranks[pid] = rank
    reply({"pids": list(ranks)})
    returncodes, first_failure = [None] * request["nproc"], 0
    timeout_at, kill_at, timed_out = time.monotonic() + request["timeout"], float("inf"), False
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            returncodes[ranks.pop(pid)] = code = os.waitstatus_to_exitcode(status)
            if code != 0 and not first_failure:  # torchrun's agent would now stop the others
                first_failure, kill_at = code, time.monotonic() + GRACE_S
        elif time.monotonic() > min(timeout_at, kill_at):
            timed_out = time.monotonic() > timeout_at
            for pid in ranks:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kill_at = timeout_at = float("inf")
        else:
            time.sleep(0.02)
    return {"returncodes": returncodes, "first_failure": first_failure, "timed_out": timed_out}


def reply(message: dict) -> None:
    print(json.dumps(message), file=PROTOCOL, flush=True)


def main() -> None:
    for line in sys.stdin:
        reply(run_job(json.loads(line)))


if __name__ == "__main__":
    main()
