"""A wait keeps the GIL only briefly: the waiting process's other threads run."""
import threading
import time

import numpy as np
import pytest

import blsshm

pytestmark = pytest.mark.timeout(60)

SLOW_RANK_DELAY_S = 0.5


def _wait_while_a_thread_ticks(comm):
    """Rank 1 posts late; rank 0 waits for it while a thread of its own ticks."""
    one = np.ones(2, np.int64)
    comm.alltoallv(one, [1, 1])  # start together
    if comm.rank == 1:
        time.sleep(SLOW_RANK_DELAY_S)
        comm.alltoallv(one, [1, 1])
        return None
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        start = time.monotonic()
        comm.alltoallv(one, [1, 1])
        end = time.monotonic()
    finally:
        stop.set()
        ticker.join()
    return {"waited_s": end - start, "ticks_during_wait": sum(start < t < end for t in ticks)}


def test_other_threads_run_while_a_rank_waits():
    out = blsshm.spawn(_wait_while_a_thread_ticks, 2, timeout=30)[0]
    assert out["waited_s"] > SLOW_RANK_DELAY_S / 2  # it did wait for the late rank
    # Holding the GIL through the wait would allow no tick at all; a wait that
    # lets go of it after microseconds allows about one per millisecond.
    assert out["ticks_during_wait"] >= 10, out
