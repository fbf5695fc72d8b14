"""blsshm: a bounded-lag synchronous (BLS) alltoallv over POSIX shared memory.

Fast ranks may run up to ``lag`` iterations ahead of the slowest, so
transient delays are absorbed, while every result is exactly what a
synchronous alltoallv returns.  Start here:

- :func:`spawn` runs a function in N processes sharing a :class:`Comm`;
- ``python -m blsshm.run -n N script.py`` starts a script N times and
  :func:`init` gives each its :class:`Comm`;
- :meth:`Comm.create` / :meth:`Comm.attach` for processes you start yourself;
- :func:`empty` for send buffers other ranks read fastest (huge pages).
"""
import os
from typing import Optional

from blsshm._core import MAX_RANKS
from blsshm.buffers import empty
from blsshm.comm import DEFAULT_ARENA_BYTES, Comm, Request
from blsshm.errors import (
    ArenaFullError, BlsError, BlsTimeoutError, BlsTypeError, BlsValueError,
    CommAborted, PeerLostError, RankFailedError,
)
from blsshm._spawn import run_ranks, spawn
from blsshm.segment import SegmentGoneError

__version__ = "0.1.0"


_initialized = None  # (pid, rank) of this process's init(): a rank attaches once


def init(*, timeout: Optional[float] = None, attach_timeout: Optional[float] = 60.0,
         spin_us: Optional[float] = None) -> Comm:
    """The :class:`Comm` of a process started by ``python -m blsshm.run``.

    Call it once per rank: the segment is gone once every rank has attached,
    so a second call raises :class:`BlsError`, as does a call in a process a
    rank started (forked or not), which inherits the rank's environment but
    is not a rank.  It does not wait for the
    other ranks: ``attach_timeout`` bounds the wait, at the first collective
    call, for all of them to call it (``None``: no bound); ``timeout`` and
    ``spin_us`` are as for :meth:`Comm.create`.
    """
    global _initialized
    from blsshm.run import ENV_LAUNCHER, ENV_NAME, ENV_RANK, ENV_SIZE
    missing = [var for var in (ENV_NAME, ENV_RANK, ENV_SIZE) if var not in os.environ]
    if missing:
        raise BlsError(
            f"blsshm.init() needs the environment set by `python -m blsshm.run -n N script.py` "
            f"({', '.join(missing)} not set); in other processes use Comm.create()/Comm.attach() "
            f"or blsshm.spawn()")
    name = os.environ[ENV_NAME]
    size = _env_int(ENV_SIZE, 1, MAX_RANKS)
    rank = _env_int(ENV_RANK, 0, size - 1, f" ({ENV_SIZE}={size})")
    if _initialized == (os.getpid(), rank):
        raise BlsError(f"blsshm.init() was already called in this process (rank {rank}): a rank "
                       f"attaches once; keep the communicator the first call returned")
    if _initialized is not None:  # the segment is gone by now: say why, not that
        raise BlsError(f"blsshm.init() in a child forked from rank {_initialized[1]} (pid {_initialized[0]}): "
                       f"{_NOT_A_RANK}")
    try:
        comm = Comm._open(name, rank, timeout=timeout, attach_timeout=attach_timeout, spin_us=spin_us,
                          owns_name=False, expected_size=size, size_source=ENV_SIZE)  # checked before claiming
    except SegmentGoneError as exc:
        launcher = os.environ.get(ENV_LAUNCHER, "")
        if launcher.isdigit() and os.getppid() != int(launcher):  # a rank's child, with the rank's environment
            raise BlsError(f"blsshm.init() in a process that inherited rank {rank}'s environment, started by "
                           f"pid {os.getppid()}, not by the launcher (pid {launcher}): {_NOT_A_RANK}") from exc
        raise
    _initialized = (os.getpid(), rank)
    return comm


_NOT_A_RANK = ("only the processes `python -m blsshm.run` started are ranks, and each attaches once; start "
               "more with -n, or use Comm.create()/Comm.attach() or blsshm.spawn() for processes of your own")


def _env_int(var, least, most, bound=""):
    value = os.environ[var]
    # A few digits only: int() would also take "1_0", " 1", other scripts'
    # digits, and refuse (ValueError) more than 4300 of them.
    number = int(value) if value.isascii() and value.isdigit() and len(value) <= 12 else least - 1
    if not least <= number <= most:
        raise BlsValueError(f"{var}={value!r} is not an integer in [{least}, {most}]{bound} "
                            f"(set by `python -m blsshm.run`)")
    return number


__all__ = [
    "Comm", "Request", "init", "spawn", "run_ranks", "empty", "DEFAULT_ARENA_BYTES",
    "BlsError", "BlsValueError", "BlsTypeError", "ArenaFullError", "BlsTimeoutError",
    "CommAborted", "PeerLostError", "RankFailedError",
]
