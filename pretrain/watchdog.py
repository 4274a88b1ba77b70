"""A hang watchdog: a thread that ends this training process when it has made no progress (a
finished step, evaluation or save) for `timeout_s` seconds, a hung collective or a stopped peer
for instance. It first writes every thread's stack to stderr (faulthandler), then exits with
EXIT_HUNG, so that torchrun's agent stops the other workers and restarts them all from the
newest complete checkpoint."""

import faulthandler
import os
import sys
import threading
import time

EXIT_HUNG = 124  # as timeout(1) reports a command that ran out of time


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.last_progress = time.monotonic()
        self.what = "the start of training"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        if timeout_s > 0:
            self._thread.start()

    def progress(self, what: str) -> None:
        """Record progress (cheap: called every step)."""
        self.last_progress, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 4, 10.0)):
            idle = time.monotonic() - self.last_progress
            if idle > self.timeout_s:
                print(f"rank {self.rank}: hung: nothing finished for {idle:.0f} s since {self.what} "
                      f"(train.hang_timeout_s={self.timeout_s:g}); the stacks of all threads follow, then this "
                      f"process exits with {EXIT_HUNG} so that torchrun restarts the workers", file=sys.stderr,
                      flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)
