"""Lifetime of the POSIX shared-memory segment behind one communicator.

The creator makes the segment with ``O_CREAT|O_EXCL``, mode 0600 and an
unguessable name, reserves its pages with ``posix_fallocate`` (a full
``/dev/shm`` is then a clean error here, never a SIGBUS later) and writes the
header.  Ranks map it by name; once every rank has attached the name is
unlinked, so a crash afterwards leaves nothing in ``/dev/shm``.
"""
import errno
import mmap
import os
import secrets

import posix_ipc

from blsshm import _core
from blsshm.errors import BlsError, BlsValueError

PREFIX = "/blsshm-"


def create(size, lag, arena_bytes):
    """Create and initialise a segment for ``size`` ranks; return its name."""
    lay = _core.layout(size, lag, arena_bytes)
    nbytes = lay["segment_bytes"]
    name = PREFIX + secrets.token_hex(16)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    try:
        try:
            os.posix_fallocate(shm.fd, 0, nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise BlsError(
                    f"cannot reserve {nbytes} bytes in /dev/shm for {size} ranks "
                    f"(arena_bytes={arena_bytes}, lag={lag}): {exc.strerror}; "
                    f"lower arena_bytes or enlarge /dev/shm") from exc
            raise
        with mmap.mmap(shm.fd, nbytes) as segment:
            _core.initialize(segment, size, lag, arena_bytes)
    except BaseException:
        shm.unlink()
        raise
    finally:
        shm.close_fd()
    return name


def _open(name):
    if not isinstance(name, str) or not name.startswith(PREFIX):
        raise BlsValueError(f"not a blsshm segment name: {name!r}")
    try:
        return posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise BlsError(
            f"segment {name} does not exist (already unlinked: every rank must attach "
            f"before any rank starts communicating)") from None


def _map(shm):
    nbytes = os.fstat(shm.fd).st_size
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(shm.fd, nbytes, flags=flags)


def open_mapping(name):
    """Map the segment called ``name`` read-write and return the ``mmap``."""
    shm = _open(name)
    try:
        return _map(shm)
    finally:
        shm.close_fd()


def open_for_rank(name):
    """``(mapping, lock_fd)`` for a rank: the read-write ``mmap`` of the
    segment called ``name``, and a descriptor of it (not inherited by exec'd
    programs) for the rank's liveness lock, which the caller closes.

    The descriptor is an open file description of its own, apart from the
    mapping's, so the lock goes exactly when it closes, however long
    zero-copy views (or a forked child) keep the mapping alive.
    """
    first = _open(name)
    try:
        lock_fd = os.dup(first.fd)
    finally:
        first.close_fd()
    try:
        second = _open(name)
        try:
            if not os.path.samestat(os.fstat(lock_fd), os.fstat(second.fd)):
                raise BlsError(f"segment {name} was replaced while this rank attached")
            return _map(second), lock_fd
        finally:
            second.close_fd()
    except BaseException:
        os.close(lock_fd)
        raise


def unlink(name):
    """Remove the name from ``/dev/shm``; mappings stay valid.  Idempotent."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
