"""Run by test_faults as a process of its own: rank 1 forks a child that
outlives it, then is SIGKILLed.  Rank 0 watches it by its liveness lock
alone (as across PID namespaces) and must still see it lost: the child must
not keep the lock held.  This process is a child subreaper, so it reaps the
orphan itself; it prints rank 0's outcome as ``exception-name lost-rank``.
"""
import ctypes
import multiprocessing
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Ranks  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def _rank(comm, child_pid, progress, release):
    comm.alltoallv(np.zeros(2), [1, 1])
    comm._set_pidfds([-1, -1])  # no pidfds: the lock is all that tells
    if comm.rank == 1:
        pid = os.fork()
        if pid == 0:  # a worker, as a DataLoader forks: it lives on after rank 1
            release.wait(60)
            os._exit(0)
        child_pid.value = pid
        progress.release()
        time.sleep(60)
    comm.alltoallv(np.zeros(2), [1, 1])


def main():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ctx = multiprocessing.get_context("fork")
    child_pid, progress, release = ctx.Value("i", 0), ctx.Semaphore(0), ctx.Event()
    try:
        with Ranks(_rank, 2, args=(child_pid, progress, release)) as ranks:
            if not progress.acquire(timeout=30):
                print("rank 1 did not fork")
                return
            os.kill(ranks.procs[1].pid, signal.SIGKILL)
            outcomes = ranks.collect(1, timeout=10)
        if 0 not in outcomes:
            print("rank 0 still waits")
        else:
            status, value = outcomes[0]
            print(value[0], value[4] if status == "error" else value)
    finally:
        release.set()
        if child_pid.value:
            os.waitpid(child_pid.value, 0)  # ours now that rank 1 is gone


if __name__ == "__main__":
    main()
