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
    CommAborted, PeerLostError,
)
from blsshm.spawn import RankFailedError, run_ranks, spawn

__version__ = "0.1.0"


def init(*, timeout: Optional[float] = None, spin_us: Optional[float] = None) -> Comm:
    """The :class:`Comm` of a process started by ``python -m blsshm.run``."""
    from blsshm.run import ENV_NAME, ENV_RANK, ENV_SIZE
    try:
        name, rank, size = os.environ[ENV_NAME], int(os.environ[ENV_RANK]), int(os.environ[ENV_SIZE])
    except (KeyError, ValueError):
        raise BlsError(
            "blsshm.init() needs the environment set by `python -m blsshm.run -n N script.py`; "
            "in other processes use Comm.create()/Comm.attach() or blsshm.spawn()") from None
    comm = Comm.attach(name, rank, timeout=timeout, spin_us=spin_us)
    if comm.size != size:
        comm.close()
        raise BlsError(f"{ENV_SIZE}={size} but the segment has {comm.size} ranks")
    return comm


__all__ = [
    "Comm", "Request", "init", "spawn", "run_ranks", "DEFAULT_ARENA_BYTES",
    "BlsError", "BlsValueError", "BlsTypeError", "ArenaFullError", "BlsTimeoutError",
    "CommAborted", "PeerLostError", "RankFailedError",
]
