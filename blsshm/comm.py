"""``Comm``: one rank's handle on a bounded-lag communicator.

The collectives (``post``, ``complete``, ``alltoallv``) are implemented in
``_core.pyx`` and inherited; this module adds what surrounds them: creating
and attaching, the start-up barrier, requests, statistics, and a lifetime
that never leaves a segment or a waiting peer behind.
"""
import os
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np

from blsshm import _core, _proc, segment
from blsshm._core import DEFAULT_TIMEOUT
from blsshm.errors import BlsError, BlsTimeoutError, BlsTypeError, BlsValueError, exception_line

if TYPE_CHECKING:
    from blsshm._core import Counts  # a name in the stub only

# Open communicators of this process.  A child made by os.fork closes its
# copies of their lock descriptors at once: a copy would keep a rank's
# liveness lock held after the rank itself died.  Its copies also refuse
# every call but close(): a post from the child would reach the peers as the
# parent's data.  _fork_guard keeps a fork
# out of the moments when a lock descriptor exists but is not registered
# (opening) or is being closed (see segment.fork_guard).
_open_comms: "weakref.WeakSet[Comm]" = weakref.WeakSet()
_fork_guard = segment.fork_guard  # held across fork() by segment's fork handlers


def _drop_inherited_locks():
    for comm in list(_open_comms):
        comm._mark_forked()  # its calls would pass for the parent's: they now raise
        try:
            comm._drop_lock_fd()
        except OSError:
            pass


os.register_at_fork(after_in_child=_drop_inherited_locks)

#: Default arena per rank; it should hold (lag + 2) of its largest records.
DEFAULT_ARENA_BYTES = 32 << 20


#: How long a wait spins before it sleeps on the futex.  While the ranks it
#: waits for run on other CPUs it pauses between checks (the answer is
#: usually a cache line away) and calls sched_yield every 2 us; while one
#: of them last waited on our CPU, as when ranks outnumber cores, it yields
#: after every check, since that rank runs only if we give way.  A wait
#: that outlasts the spin pays a wake-up: 17 us median (p90 35 us) in one
#: session, 95-130 us (p90 up to 1.6 ms) in another on the same kind of VM,
#: where a virtual CPU leaves its idle state.  A 1 ms spin keeps the moderate
#: waits of imbalanced iterations free of it and costs nothing measurable
#: when ranks share cores.  In three runs of the tool side by side (after a
#: warm-up, start-up not timed), 8 ranks on 2 cores ran 2000 alltoallv in
#: 0.069-0.102 s with it (0-39 sleeps) against 0.073-0.176 s sleeping after
#: 2 us; 4 ranks on 2 cores, each busy 0.5 ms per iteration plus 2 ms in 10%
#: of iterations (0.56 s of CPU work per core), ran 400 iterations at lag 4
#: in 0.628-0.712 s against 0.635-0.857 s, at lag 0 in 0.714-0.749 s against
#: 0.738-0.820 s.  Reproduce with ``python tools/spin_policy.py``.
SPIN_US = 1000.0


def default_spin_us():
    """How long a wait spins before it sleeps (``BLSSHM_SPIN_US`` overrides)."""
    env = os.environ.get("BLSSHM_SPIN_US", "").strip()
    if not env:
        return SPIN_US
    try:
        us = float(env)
    except ValueError:
        us = float("nan")
    if not 0 <= us <= MAX_SPIN_US:  # also refuses nan and inf
        raise BlsValueError(f"BLSSHM_SPIN_US must be a number of microseconds in [0, {MAX_SPIN_US:.0f}], "
                            f"got {env!r}")
    return us


#: How often a wait (sleeping, or spinning long) checks that the ranks it waits for are
#: alive (milliseconds): a dead or closed peer is noticed within about this.
LIVENESS_MS = 50.0


def ptracer_policy():
    """``"any"``: under Yama's ptrace_scope 1 a rank lets its peers read the blocks it
    offers (see ``_proc.allow_peer_reads``); ``"keep"``: it leaves the ptrace
    setting alone, and those blocks go through its record (``BLSSHM_PTRACER``)."""
    env = os.environ.get("BLSSHM_PTRACER", "").strip().lower()
    if env in ("", "any"):
        return "any"
    if env == "keep":
        return "keep"
    raise BlsValueError(f"BLSSHM_PTRACER must be 'any' (the default) or 'keep', got {env!r}")


def liveness_ms():
    """How often a wait checks its peers are alive (``BLSSHM_LIVENESS_MS`` overrides)."""
    env = os.environ.get("BLSSHM_LIVENESS_MS", "").strip()
    if not env:
        return LIVENESS_MS
    try:
        ms = float(env)
    except ValueError:
        ms = float("nan")
    if not 0.001 <= ms <= 3.6e6:  # under a microsecond a sleeping wait would only spin
        raise BlsValueError(f"BLSSHM_LIVENESS_MS must be a number of milliseconds in [0.001, 3600000], got {env!r}")
    return ms


#: The longest spin accepted (an hour): waits add it to the clock in int64 ns.
MAX_SPIN_US = 3.6e9


def _is_real(value):
    """A real number, not a bool (True would mean 1 s or 1 us)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_spin_us(spin_us):
    if not _is_real(spin_us):
        raise BlsTypeError(f"spin_us must be a number of microseconds, got {spin_us!r}")
    try:
        spin_us = float(spin_us)
    except OverflowError:  # an int beyond any float
        spin_us = float("inf")
    if not 0 <= spin_us <= MAX_SPIN_US:  # also refuses nan and inf
        raise BlsValueError(f"spin_us must be a number of microseconds in [0, {MAX_SPIN_US:.0f}], got {spin_us}")
    return spin_us


def _check_seconds(what, value):
    """``value`` if it is a number of seconds >= 0 or None; raised here, not at the first wait."""
    if value is None:
        return None
    if not _is_real(value):
        raise BlsTypeError(f"{what} must be a number of seconds or None, got {value!r}")
    if not value >= 0:
        raise BlsValueError(f"{what} must be >= 0 or None, got {value}")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float: forever
        return float("inf")


def _check_int(what, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise BlsTypeError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


class Comm(_core.Core):
    """One rank of a bounded-lag synchronous (BLS) alltoallv communicator.

    Make one with :meth:`create` (the first rank makes the segment),
    :meth:`attach` (the other ranks), :func:`blsshm.init` (under
    ``python -m blsshm.run``) or :func:`blsshm.spawn`.

    Each rank calls the collective for iterations ``t = 0, 1, 2, ...`` in
    order.  :meth:`post` publishes this rank's blocks of ``t`` and returns
    as soon as every rank has completed ``t - lag - 1`` (given an arena of
    ``lag + 2`` records: see :meth:`create`); :meth:`complete`
    returns exactly what every rank posted to this one for ``t``.  With
    ``lag = 0``, :meth:`alltoallv` is an ordinary synchronous alltoallv.
    Counts are in elements of the array's dtype, blocks in rank order.

    Use it as a context manager: leaving the block closes this rank, and
    leaving it on an exception aborts the communicator so no peer waits.
    It serves one call at a time: a call made while another is in progress
    (from a signal handler, or another thread while one waits) raises
    :class:`BlsError`; only :meth:`close` and :meth:`abort` may interrupt.
    Attributes: ``rank``, ``size``, ``lag``, ``name`` (of the segment, for
    :meth:`attach`), ``timeout`` (default for every wait, ``None`` blocks),
    ``next_post``, ``next_complete``, ``arena_bytes``, ``copy_policy``
    and ``direct_min_bytes`` (how large a block :meth:`alltoallv` offers for
    a direct read; settable, 0 turns direct reads off).
    """

    name: str
    _lock_fd: int
    _pid: int
    _pid_ns: int
    _attach_timeout: Optional[float]
    _poll_deadline: Optional[float]
    _owns_name: bool
    _mapping: Any

    def __init__(self, *_args, **_kwargs):
        raise TypeError("use Comm.create(), Comm.attach(), blsshm.init() or blsshm.spawn()")

    @classmethod
    def _open(cls, name, rank, *, timeout, attach_timeout, spin_us, owns_name,
              expected_size=-1, size_source="size"):
        mapping = None
        lock_fd = -1
        try:
            spin_us = _check_spin_us(default_spin_us() if spin_us is None else spin_us)  # before claiming the rank
            attach_timeout = _check_seconds("attach_timeout", attach_timeout)
            timeout = _check_seconds("timeout", timeout)
            if rank < 0:  # the segment says how many there are (checked once it is mapped)
                raise BlsValueError(f"rank must be at least 0, got {rank}")
            if rank >= _core.MAX_RANKS:  # keeps C ints in range
                raise BlsValueError(f"rank {rank} is past any communicator's last (sizes are at most "
                                    f"{_core.MAX_RANKS})")
            spin_ns = int(1000 * spin_us)
            slice_ns = int(1e6 * liveness_ms())
            self = cls.__new__(cls)
            self.name = name
            self._lock_fd = -1
            self._pid = os.getpid()  # a forked child's copy must not unlink or abort
            self._pid_ns = _proc.pid_namespace()
            self.permit_peer_reads = ptracer_policy() == "any"  # checked before claiming the rank
            self._attach_timeout = attach_timeout
            self._poll_deadline = None  # when arrived() stops answering False for a missing rank
            self._owns_name = owns_name
            with _fork_guard:
                mapping, lock_fd = segment.open_for_rank(name)
                self._mapping = mapping
                self._lock_fd = lock_fd
                _open_comms.add(self)
            self._attach_mapping(mapping, rank, lock_fd, self._pid_ns, expected_size, size_source)
        except BaseException:
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # the rank's views of it (a Ctrl-C after they were made): they unmap it
                    pass
            if lock_fd >= 0:
                with _fork_guard:
                    _open_comms.discard(self)
                    self._lock_fd = -1
                    os.close(lock_fd)
            if owns_name:
                segment.unlink(name)
            raise
        if len(self._attached_ranks()) == self.size:
            segment.unlink(name)  # the last to attach: from now on a crash leaks nothing
        self.spin_ns = spin_ns
        self.slice_ns = slice_ns
        self.timeout = timeout
        return self

    @classmethod
    def create(cls, size: int, rank: int = 0, *, lag: int = 0, arena_bytes: int = DEFAULT_ARENA_BYTES,
               timeout: Optional[float] = None, attach_timeout: Optional[float] = 60.0,
               spin_us: Optional[float] = None) -> "Comm":
        """Create a communicator of ``size`` ranks and attach to it as ``rank``.

        Other processes join with ``Comm.attach(comm.name, r)``.  ``lag`` is
        the bound L; ``arena_bytes`` is each rank's room for its in-flight
        records, at least ``(lag + 2)`` times the largest record for ``post``
        never to wait beyond the lag bound (a record is one iteration's
        blocks, each rounded up to 64 bytes).  ``timeout`` (seconds, ``None``
        blocks) is the default for every wait; ``attach_timeout`` bounds the
        wait, at the first collective call, for every rank to attach
        (``None``: no bound), as does a ``timeout`` given to that call (not
        the default ``timeout``: peers may be slow to start).
        ``spin_us`` is how long a wait spins before it sleeps.
        """
        size = _check_int("size", size)
        rank = _check_int("rank", rank)
        if size < 1:
            raise BlsValueError(f"size must be at least 1, got {size}")
        if not 0 <= rank < size:
            raise BlsValueError(f"rank must be in [0, {size}), got {rank}")
        # Before the segment and its reaper exist (attach checks them again, as the others).
        _check_spin_us(default_spin_us() if spin_us is None else spin_us)
        _check_seconds("attach_timeout", attach_timeout)
        _check_seconds("timeout", timeout)
        liveness_ms()
        ptracer_policy()
        name = segment.create(size, _check_int("lag", lag), _check_int("arena_bytes", arena_bytes), reaped=True)
        try:
            return cls._open(name, rank, timeout=timeout, attach_timeout=attach_timeout,
                             spin_us=spin_us, owns_name=True)
        except BaseException:  # _open unlinks on its own errors; this covers a Ctrl-C before its try
            segment.unlink(name)
            raise

    @classmethod
    def attach(cls, name: str, rank: int, *, timeout: Optional[float] = None, attach_timeout: Optional[float] = 60.0,
               spin_us: Optional[float] = None) -> "Comm":
        """Attach to the communicator called ``name`` (see :meth:`create`) as ``rank``."""
        return cls._open(name, _check_int("rank", rank), timeout=timeout,
                         attach_timeout=attach_timeout, spin_us=spin_us, owns_name=False)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._core_closed

    # --------------------------------------------------------------- startup

    def _raise_not_attached(self, attached, seconds=None, what="attach_timeout"):
        missing = sorted(set(range(self.size)) - set(attached))
        seconds = self._attach_timeout if seconds is None else seconds
        raise BlsTimeoutError(
            f"rank(s) {missing} did not attach to {self.name} within {seconds} s ({what})",
            operation="attach", waiting_for=missing)

    def _poll_ready(self):
        """Whether every rank attached (then made ready), without waiting.

        For :meth:`arrived`: raises like :meth:`_make_ready` once
        ``attach_timeout`` has passed since the first poll, so a loop that
        polls is not left waiting for a rank that never comes; the poll
        after that starts a new ``attach_timeout``.
        """
        attached = self._attached_ranks()
        if len(attached) == self.size:
            self._make_ready()  # returns at once: everyone is here
            return True
        self._lose_the_departed()
        self._check()
        if self._attach_timeout is not None:
            now = time.monotonic()
            if self._poll_deadline is None:
                self._poll_deadline = now + self._attach_timeout
            elif now > self._poll_deadline:
                self._poll_deadline = None  # the next poll starts a new attach_timeout, as a blocking call does
                self._raise_not_attached(attached)
        return False

    def _make_ready(self, timeout=None):
        """Wait until every rank attached, unlink the name, watch the peers' processes.

        ``timeout`` is the ``timeout`` argument of the call that waits
        (seconds, checked; None if it had none), which bounds it as well as
        ``attach_timeout``.
        """
        try:
            self._wait_for_every_rank(timeout)
        except BlsValueError:
            if self.closed:  # by a signal handler meanwhile: said as a wait's close is (not bad input)
                raise BlsError("communicator was closed while waiting for every rank to attach "
                               "(by a signal handler)") from None
            raise

    def _wait_for_every_rank(self, timeout):
        """``_make_ready``'s work; its reads of the segment raise BlsValueError once it is closed."""
        self._check()
        now = time.monotonic()
        limits = [(seconds, what) for seconds, what in ((self._attach_timeout, "attach_timeout"),
                                                        (timeout, "the call's timeout"))
                  if seconds is not None and seconds < 1e9]  # beyond: for ever, not an OverflowError
        seconds, what = min(limits) if limits else (None, "")
        deadline = None if seconds is None else now + float(seconds)
        delay = 1e-4
        while True:
            attached = self._attached_ranks()
            if len(attached) == self.size:
                break
            self._lose_the_departed()  # a rank that attached and left: it never takes part
            self._check()  # raises if a rank gave up already
            if deadline is not None and time.monotonic() >= deadline:
                self._raise_not_attached(attached, seconds, what)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        # The last rank to attach unlinked the name already; this is for the
        # case where it died before it could.
        segment.unlink(self.name)
        # A peer's pid names its process only in its own PID namespace; in
        # another one (containers sharing /dev/shm) it is someone else's or
        # nobody's, and only its liveness lock tells.
        fds = []
        try:
            for r, (pid, pid_ns) in enumerate(self._peer_pids()):
                fd = -1
                if r != self.rank and pid > 0 and pid_ns == self._pid_ns != 0:
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        fd = -1  # gone, or no pidfds here: its lock tells
                    if fd >= 0 and self._lock_released(r):
                        os.close(fd)  # it died before we opened it: the pid may be another's now
                        fd = -1
                fds.append(fd)
        except BaseException:  # interrupted
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise
        self._set_pidfds(fds)  # the core's from now on (or closed by it, if we were closed meanwhile)
        self.ready = True

    # ------------------------------------------------------------ collectives
    # post, complete, alltoallv, post_views and complete_views are inherited
    # from _core.Core.

    def ialltoallv(self, send: Any, send_counts: "Counts", *, timeout: Any = DEFAULT_TIMEOUT) -> "Request":
        """Post the next iteration and return a :class:`Request` whose ``wait()`` completes it."""
        t = self.next_post
        self.post(t, send, send_counts, timeout=timeout)
        return Request(self, t)

    # ------------------------------------------------------------- lifecycle

    def abort(self, reason: str = "aborted by the user") -> None:
        """Abort the communicator: in every rank, later posts and waits that cannot be met raise ``CommAborted``.

        An iteration whose blocks had all arrived still completes (as with a
        dead peer's last posts), so peers finish what this rank took part in;
        a direct read under way (see :meth:`alltoallv`) gets a second to end.
        """
        if not self.closed:
            self._abort(str(reason))

    def _drop_lock_fd(self):
        """Close this process's descriptor of our liveness lock (idempotent)."""
        with _fork_guard:
            fd, self._lock_fd = self._lock_fd, -1
            self._forget_lock_fd()
            _open_comms.discard(self)
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        """Leave the communicator.  Idempotent.

        Peers that still wait for this rank raise :class:`PeerLostError`.
        Views handed out earlier stay valid memory until they are dropped.
        A communicator belongs to one thread: to interrupt a wait from another
        thread, call :meth:`abort`, never ``close``.  A signal handler may
        close it; the call it interrupted then raises :class:`BlsError`.  In
        a child made by ``os.fork`` every other call raises ``BlsError``, and
        ``close`` only drops the child's copy (and so does leaving a ``with``
        block there, even on an exception).
        """
        if self.closed:
            return
        try:
            self._close_core()
        finally:
            self._drop_lock_fd()  # peers that look now see the lock gone, after our CLOSED state
            if self._owns_name and not self.ready and os.getpid() == self._pid:
                # The creator leaving before the start-up barrier takes the
                # name with it (spawn and the launcher own theirs and unlink).
                segment.unlink(self.name)
            try:
                self._mapping.close()
            except BufferError:
                pass  # zero-copy views still use it: unmapped when the last one goes
            self._mapping = None

    def __enter__(self) -> "Comm":
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and not self.closed and os.getpid() == self._pid:
                self._abort(f"rank {self.rank} raised {exception_line(exc)}")
        finally:
            self.close()
        return False

    def __del__(self):
        try:
            if hasattr(self, "_mapping"):
                self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self.closed else f"next_post {self.next_post}"
        return f"<blsshm.Comm rank {self.rank} of {self.size}, lag {self.lag}, {state}>"

    def __reduce__(self):
        raise TypeError("a Comm belongs to one process; pass comm.name and attach in the other one")

    # ------------------------------------------------------------ statistics

    @property
    def stats(self) -> Dict[str, Union[int, float]]:
        """Counters since :meth:`reset_stats` (or creation): seconds waited in post
        and in complete (not the first call's wait for every rank to attach),
        futex sleeps, moves off a CPU crowded with other ranks (see
        ``_spread.h``), payload bytes sent and received, and of those sent,
        the bytes copied with streaming stores (see ``copy_policy``), and of
        those received, the bytes read straight from the sender's ``send``
        (see ``direct_min_bytes``).  The iteration
        counts are ``next_post`` and ``next_complete``, since creation: a reset
        leaves them alone."""
        return {
            "iterations_posted": self.next_post,
            "iterations_completed": self.next_complete,
            "post_wait_s": self.post_wait_ns / 1e9,
            "complete_wait_s": self.complete_wait_ns / 1e9,
            "futex_sleeps": self.futex_sleeps,
            "cpu_moves": self.cpu_moves,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_streamed": self.bytes_streamed,
            "bytes_read_direct": self.bytes_read_direct,
        }


class Request:
    """The completion half of :meth:`Comm.ialltoallv`; ``wait()`` it in iteration order."""

    __slots__ = ("_comm", "iteration", "_result")

    def __init__(self, comm, iteration):
        self._comm = comm
        self.iteration = iteration
        self._result = None

    def wait(self, out: Any = None, *, timeout: Any = DEFAULT_TIMEOUT) -> Tuple[Any, Any]:
        """Complete the iteration: ``(recv, recv_counts)``.  Repeated calls return the same."""
        if self._result is None:
            self._result = self._comm.complete(self.iteration, out, timeout=timeout)
        return self._result
