"""Lifetime of the POSIX shared-memory segment behind one communicator.

The creator makes the segment with ``O_CREAT|O_EXCL``, mode 0600 and an
unguessable name, reserves its pages with ``posix_fallocate`` (a full
``/dev/shm`` is then a clean error here, never a SIGBUS later) and writes the
header.  Ranks map it by name; once every rank has attached the name is
unlinked, so a crash afterwards leaves nothing in ``/dev/shm``.  Before
that, the creator (the launcher, ``spawn``, a ``Comm.create`` rank) asks for
a reaper: a small process that unlinks the name if the creator dies first,
even of SIGKILL or an unhandled SIGTERM, which no handler of its own could
outlive.  Its communicator cannot work without it then anyway: spawn's and
the launcher's ranks die with them, and a ``Comm.create`` creator is a rank.
"""
import errno
import fcntl
import mmap
import os
import re
import secrets
import socket
import subprocess
import sys
import threading

import posix_ipc

from blsshm import _core
from blsshm.errors import BlsError, BlsTypeError, BlsValueError

PREFIX = "/blsshm-"
NAME = re.compile(re.escape(PREFIX) + "[0-9a-f]{32}")  # what create() makes: checked before the kernel sees it
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory: name /x is file /dev/shm/x
#: Random names tried before create() gives up: 128 bits each, so a second
#: is needed only if someone makes segments of our names on purpose.
NAME_ATTEMPTS = 3
UNLINKED = b"unlinked"  # what the creator tells its reaper once the name is gone
# What shm_open may raise besides a missing name: no inode or descriptor left,
# EACCES (another user's segment is mode 0600: posix_ipc.PermissionsError), EROFS.
_SHM_ERRORS = (OSError, posix_ipc.Error)

# The reaper reads its pipe until the creator says UNLINKED (it removed the
# name itself) or the pipe closes without it (the creator died: the name goes
# now); any other line changes nothing.  A POSIX shell, not Python: the reaper
# starts while the ranks do, and an interpreter's start (10-30 ms of CPU here)
# took a CPU from a rank, so the ranks' first iterations stalled for
# milliseconds in half the runs of 2 ranks on 2 cores; sh starts in well
# under one.  It ignores INT, TERM and HUP (in a session of its own it should
# get none); rm -f: a name already gone is fine.  Its PATH starts with the
# usual places of rm: the creator's may not lead to one (a venv's bin only).
REAPER_SHELL = "/bin/sh"
REAPER_PATH = "/usr/bin:/bin"
REAPER = f"""trap '' INT TERM HUP
while IFS= read -r said; do
    [ "$said" = {UNLINKED.decode()} ] && exit 0
done
[ "$said" = {UNLINKED.decode()} ] || exec rm -f -- "$1"
"""

_reapers: "dict[str, tuple[subprocess.Popen, int]]" = {}  # name -> (reaper process, our end of its pipe)

#: Held across fork(), and while a descriptor a child must not keep exists
#: but is not yet registered where the child's fork handler finds it: a
#: reaper's pipe here (the reaper would never see its creator die), a rank's
#: liveness lock in comm.py.  One lock for both, so no two fork handlers take
#: two locks in an order a guarded section could reverse; reentrant, as a
#: collected Comm may close inside a guarded section.  (Popen's own fork runs
#: no fork handlers, so Popen may run inside.)
fork_guard = threading.RLock()


def _after_fork_in_child():
    """The reapers are the parent's, and our copies of their pipes would keep
    them from seeing the parent die."""
    for proc, write_end in _reapers.values():
        os.close(write_end)
        # Not this process's child: its copy of the Popen must not wait for
        # it, nor warn at collection that it still runs (ResourceWarning).
        proc.returncode = 0
    _reapers.clear()
    fork_guard.release()  # taken by the thread that forked, which we are


os.register_at_fork(before=fork_guard.acquire, after_in_parent=fork_guard.release,
                    after_in_child=_after_fork_in_child)


def create(size, lag, arena_bytes, reaped=False):
    """Create and initialise a segment for ``size`` ranks; return its name.

    With ``reaped``, a reaper process unlinks the name if this process dies
    before calling :func:`unlink`; it starts before the segment exists.  A
    program that cannot start one (no ``/bin/sh``) goes without: every
    other exit still unlinks.
    """
    lay = _core.layout(size, lag, arena_bytes)
    nbytes = lay["segment_bytes"]
    for _ in range(NAME_ATTEMPTS):
        name = PREFIX + secrets.token_hex(16)
        try:
            if reaped:
                _start_reaper(name)
            if _create(name, size, lag, arena_bytes, nbytes):
                return name
        except BaseException as exc:
            unlink(name)  # stops the reaper
            if isinstance(exc, _SHM_ERRORS):
                raise BlsError(f"cannot create a segment in {SHM_DIR} for {size} ranks: {exc}") from exc
            raise
        # The name is another communicator's segment: not ours to unlink.
        if name in _reapers:
            _stop_reaper(name)
    raise BlsError(f"cannot create a segment in {SHM_DIR} for {size} ranks: "
                   f"{NAME_ATTEMPTS} random names in a row were taken")


def _create(name, size, lag, arena_bytes, nbytes):
    """Create, size and initialise the segment ``name``; False if the name is taken."""
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    except posix_ipc.ExistentialError:
        if os.path.exists(SHM_DIR + name):  # EEXIST; ENOENT (no /dev/shm) is the same exception
            return False
        raise
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
    finally:
        shm.close_fd()
    return True


def _start_reaper(name):
    # Its own session: a terminal's Ctrl-C, which the creator handles, must
    # not end the reaper first.  Our end of the pipe is not inherited by
    # programs we start, and forked children close it: only our death does.
    # The "pipe" is a Unix socket pair, so that telling a reaper killed by
    # hand is an error (MSG_NOSIGNAL), not a SIGPIPE that kills a creator
    # which restored SIGPIPE's default action, as command-line tools do.
    with fork_guard:
        try:
            ours, theirs = socket.socketpair()
        except OSError:
            return  # no descriptor left: go without (see create)
        write_end, read_end = ours.detach(), theirs.detach()  # plain descriptors, closed by hand
        proc = None
        try:
            if write_end <= 2:
                # A creator started without stdin, stdout or stderr would
                # send what it prints there to the reaper: move it up.
                low = write_end
                write_end = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 3)
                os.close(low)
            path = REAPER_PATH + os.pathsep + os.environ.get("PATH", "")
            proc = subprocess.Popen([REAPER_SHELL, "-c", REAPER, "blsshm-reaper", SHM_DIR + name],
                                    stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
                                    env={"PATH": path})
        except OSError:
            pass  # no shell to run it (or no descriptor left): go without (see create)
        finally:
            os.close(read_end)
            if proc is None:
                os.close(write_end)
        if proc is not None:
            _reapers[name] = (proc, write_end)


def _stop_reaper(name):
    with fork_guard:  # a child forked between the pop and the close would keep the pipe open
        proc, write_end = _reapers.pop(name)
        end = socket.socket(fileno=write_end)
        try:
            end.send(UNLINKED + b"\n", socket.MSG_NOSIGNAL)  # a whole line: it exits now
        except (BrokenPipeError, ConnectionResetError):  # it died (killed by hand): nothing more to tell it
            pass
        finally:
            end.close()
    # It exits on reading that line, once its shell has started, even if a
    # process forked past our fork handler still holds the pipe: waited for
    # by a thread, so the call that removed the name (the first collective,
    # arrived() included) does not wait.
    # Not while the interpreter shuts down (a comm closed by its __del__
    # then): before 3.12 a thread started then never runs, and start()
    # waits for it forever; 3.12 raises RuntimeError.
    if sys.is_finalizing():
        proc.wait()
        return
    try:
        threading.Thread(target=proc.wait, name=f"blsshm reaper of {name}", daemon=True).start()
    except RuntimeError:  # no thread now (a thread limit): wait here
        proc.wait()


class SegmentGoneError(BlsError):
    """The segment named is not (or no longer) in /dev/shm: see ``_open``."""


def _open(name):
    if not isinstance(name, str):
        raise BlsTypeError(f"a segment name is a str, got {type(name).__name__}")
    if not NAME.fullmatch(name):
        raise BlsValueError(f"not a blsshm segment name: {name!r} (they are {PREFIX} and 32 hex digits)")
    try:
        return posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise SegmentGoneError(
            f"segment {name} does not exist (already unlinked: every rank must attach "
            f"before any rank starts communicating, and the creator must not have closed or died)") from None
    except _SHM_ERRORS as exc:
        raise BlsError(f"cannot open segment {name}: {exc}") from exc


def _map(shm):
    nbytes = os.fstat(shm.fd).st_size
    if nbytes == 0:  # mmap's own error would be a bare ValueError
        raise BlsValueError(f"not a blsshm segment: {shm.name} is empty")
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
    """Remove the name from ``/dev/shm``; mappings stay valid.  Idempotent.

    Stops the name's reaper (see :func:`create`) once the name is gone.
    """
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
    if name in _reapers:
        _stop_reaper(name)
