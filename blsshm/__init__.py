"""blsshm: a bounded-lag synchronous (BLS) alltoallv over POSIX shared memory.

Fast ranks may run up to ``lag`` iterations ahead of the slowest, so
transient delays are absorbed, while every result is exactly what a
synchronous alltoallv returns.  Start here:

- :func:`spawn` runs a function in N processes sharing a :class:`Comm`;
- ``python -m blsshm.run -n N script.py`` starts a script N times and
  :func:`init` gives each its :class:`Comm`;
- :meth:`Comm.create` / :meth:`Comm.attach` for processes you start yourself.
"""
import os
from typing import Optional

from blsshm.comm import DEFAULT_ARENA_BYTES, Comm, Request
from blsshm.errors import (
    ArenaFullError, BlsError, BlsTimeoutError, BlsTypeError, BlsValueError,
    CommAborted, PeerLostError, RankFailedError,
)
from blsshm._spawn import run_ranks, spawn

__version__ = "0.1.0"


_initialized = None  # (pid, rank) of this process's init(): a rank attaches once


def init(*, timeout: Optional[float] = None, attach_timeout: float = 60.0,
         spin_us: Optional[float] = None) -> Comm:
    """The :class:`Comm` of a process started by ``python -m blsshm.run``.

    Call it once per rank: the segment is gone once every rank has attached,
    so a second call raises :class:`BlsError`.  ``attach_timeout`` bounds
    the wait for the other ranks to call it; ``timeout`` and ``spin_us`` are
    as for :meth:`Comm.create`.
    """
    global _initialized
    from blsshm.run import ENV_NAME, ENV_RANK, ENV_SIZE
    try:
        name, rank, size = os.environ[ENV_NAME], int(os.environ[ENV_RANK]), int(os.environ[ENV_SIZE])
    except (KeyError, ValueError):
        raise BlsError(
            "blsshm.init() needs the environment set by `python -m blsshm.run -n N script.py`; "
            "in other processes use Comm.create()/Comm.attach() or blsshm.spawn()") from None
    if _initialized == (os.getpid(), rank):
        raise BlsError(f"blsshm.init() was already called in this process (rank {rank}): a rank "
                       f"attaches once; keep the communicator the first call returned")
    comm = Comm.attach(name, rank, timeout=timeout, attach_timeout=attach_timeout, spin_us=spin_us)
    _initialized = (os.getpid(), rank)
    if comm.size != size:
        comm.close()
        raise BlsError(f"{ENV_SIZE}={size} but the segment has {comm.size} ranks")
    return comm


__all__ = [
    "Comm", "Request", "init", "spawn", "run_ranks", "DEFAULT_ARENA_BYTES",
    "BlsError", "BlsValueError", "BlsTypeError", "ArenaFullError", "BlsTimeoutError",
    "CommAborted", "PeerLostError", "RankFailedError",
]
