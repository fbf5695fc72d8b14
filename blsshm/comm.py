"""``Comm``: one rank's handle on a bounded-lag communicator.

The protocol lives in ``_core.pyx``; this module adds what users touch:
creating and attaching, torch tensors, zero-copy views, requests, statistics,
and a lifetime that never leaves a segment or a waiting peer behind.
"""
import os
import sys
import time

import numpy as np

from blsshm import _core, segment
from blsshm.errors import BlsError, BlsTimeoutError, BlsTypeError, BlsValueError

#: Default arena per rank: room for (lag + 1) records of its outgoing data.
DEFAULT_ARENA_BYTES = 32 << 20

_BLOCK = object()  # "use the communicator's default timeout"


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _default_spin_us(size):
    """Spin briefly before sleeping; barely at all when ranks outnumber cores,
    because then the rank we wait for may need our core to make progress."""
    env = os.environ.get("BLSSHM_SPIN_US")
    if env is not None:
        return float(env)
    return 50.0 if size <= _cpu_count() else 2.0


def _as_array(x, what):
    """``(ndarray, was_torch)`` for a numpy array or CPU torch tensor, no copy."""
    if isinstance(x, np.ndarray):
        return x, False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise BlsTypeError(f"{what} is a tensor on {x.device}; blsshm moves CPU tensors only")
        try:
            return x.detach().numpy(), True
        except TypeError as exc:
            raise BlsTypeError(f"{what} has dtype {x.dtype}, which numpy cannot view: {exc}") from None
    raise BlsTypeError(f"{what} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


class Comm:
    """One rank of a bounded-lag synchronous (BLS) alltoallv communicator.

    Make one with :meth:`create` (first rank, makes the segment),
    :meth:`attach` (other ranks), :func:`blsshm.init` (under
    ``python -m blsshm.run``) or :func:`blsshm.spawn`.

    Each rank calls the collective for iterations ``t = 0, 1, 2, ...`` in
    order.  ``post(t)`` publishes this rank's blocks and returns as soon as
    every rank has completed ``t - lag - 1``; ``complete(t)`` returns exactly
    what every rank posted to this one for ``t``.  With ``lag = 0``,
    :meth:`alltoallv` is an ordinary synchronous alltoallv.

    Counts are in elements of the array's dtype; blocks are laid out in rank
    order.  Use as a context manager: leaving the block closes the rank, and
    leaving it on an exception aborts the communicator so no peer waits.
    """

    def __init__(self, *_args, **_kwargs):
        raise TypeError("use Comm.create(), Comm.attach(), blsshm.init() or blsshm.spawn()")

    @classmethod
    def _open(cls, name, rank, *, timeout, attach_timeout, spin_us, owns_name):
        self = object.__new__(cls)
        self._core = None
        self._mapping = None
        self._pidfds = []
        self.name = name
        mapping = segment.open_mapping(name)
        try:
            core = _core.Core(mapping, rank)
            core.spin_ns = int(1000 * (spin_us if spin_us is not None else _default_spin_us(core.size)))
        except BaseException:
            mapping.close()
            if owns_name:
                segment.unlink(name)
            raise
        self._core = core
        self._mapping = mapping
        self._ready = False
        self._attach_timeout = attach_timeout
        self.timeout = timeout
        self._slot_torch = [False] * (core.lag + 1)
        return self

    @classmethod
    def create(cls, size, rank=0, *, lag=0, arena_bytes=DEFAULT_ARENA_BYTES, timeout=None,
               attach_timeout=60.0, spin_us=None):
        """Create a communicator of ``size`` ranks and attach to it as ``rank``.

        Other ranks join with ``Comm.attach(comm.name, r)``.  ``lag`` is the
        bound L; ``arena_bytes`` the room per rank for its in-flight records
        (at least ``(lag + 1)`` times the largest record).  ``timeout``
        (seconds, ``None`` blocks) is the default for every wait;
        ``attach_timeout`` bounds the wait for all ranks to attach, which
        happens on the first collective call.
        """
        for what, value in (("size", size), ("rank", rank), ("lag", lag), ("arena_bytes", arena_bytes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise BlsTypeError(f"{what} must be an integer, got {type(value).__name__}")
        if not 0 <= rank < size:
            raise BlsValueError(f"rank must be in [0, {size}), got {rank}")
        name = segment.create(int(size), int(lag), int(arena_bytes))
        return cls._open(name, int(rank), timeout=timeout, attach_timeout=attach_timeout,
                         spin_us=spin_us, owns_name=True)

    @classmethod
    def attach(cls, name, rank, *, timeout=None, attach_timeout=60.0, spin_us=None):
        """Attach to the communicator called ``name`` (see :meth:`create`) as ``rank``."""
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
            raise BlsTypeError(f"rank must be an integer, got {type(rank).__name__}")
        return cls._open(name, int(rank), timeout=timeout, attach_timeout=attach_timeout,
                         spin_us=spin_us, owns_name=False)

    # ------------------------------------------------------------ properties

    @property
    def rank(self):
        """This process's rank, ``0 <= rank < size``."""
        return self._core.rank

    @property
    def size(self):
        """Number of ranks."""
        return self._core.size

    @property
    def lag(self):
        """The lag bound L: ``post(t)`` waits only for completions of ``t - L - 1``."""
        return self._core.lag

    @property
    def arena_bytes(self):
        """Bytes of in-flight records this rank can hold."""
        return self._core.arena_bytes

    @property
    def next_post(self):
        """The iteration the next ``post`` must name."""
        return self._core.next_post

    @property
    def next_complete(self):
        """The iteration the next ``complete`` must name."""
        return self._core.next_complete

    @property
    def closed(self):
        return self._core is None or self._core.is_closed

    # --------------------------------------------------------------- startup

    def _make_ready(self):
        """Wait until every rank attached, unlink the name, watch the peers' pids."""
        core = self._core
        if core is None or core.is_closed:
            raise BlsError("communicator is closed")
        deadline = None if self._attach_timeout is None else time.monotonic() + self._attach_timeout
        delay = 1e-4
        while True:
            attached = core.attached_ranks()
            if len(attached) == core.size:
                break
            core.check()  # raises CommAborted if a rank gave up already
            if deadline is not None and time.monotonic() > deadline:
                missing = sorted(set(range(core.size)) - set(attached))
                raise BlsTimeoutError(
                    f"rank(s) {missing} did not attach to {self.name} within {self._attach_timeout} s",
                    operation="attach", waiting_for=missing)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        # From here on a crash leaks nothing: the mapping lives, the name is gone.
        segment.unlink(self.name)
        fds = []
        for r, pid in enumerate(core.peer_pids()):
            fd = -1
            if r != core.rank and pid > 0:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    fd = -1  # already gone: it will be noticed as closed or dead
                except (AttributeError, OSError):
                    fd = -1
            fds.append(fd)
        self._pidfds = [fd for fd in fds if fd >= 0]
        core.set_pidfds(fds)
        self._ready = True

    def _timeout(self, timeout):
        return self.timeout if timeout is _BLOCK else timeout

    # ------------------------------------------------------------ collectives

    def alltoallv(self, send, send_counts, out=None, *, timeout=_BLOCK):
        """Blocking alltoallv: post the next iteration and complete it.

        ``send`` is a C-contiguous numpy array or CPU torch tensor holding the
        blocks for ranks ``0..size-1`` back to back; ``send_counts[q]`` is
        the number of elements for rank ``q`` and they must add up to
        ``send.size``.  Returns ``(recv, recv_counts)``: the blocks from every
        rank in rank order, and their counts.  ``out`` may supply the memory
        for ``recv`` (same dtype, large enough).  A torch ``send`` gives a
        torch ``recv`` (sharing memory with the numpy result, no copy).
        """
        if not self._ready:
            self._make_ready()
        if timeout is _BLOCK:
            timeout = self.timeout
        if type(send) is np.ndarray and out is None:
            return self._core.alltoallv(send, send_counts, None, timeout)
        t = self._core.next_post
        self.post(t, send, send_counts, timeout=timeout)
        return self.complete(t, out, timeout=timeout)

    def post(self, t, send, send_counts, *, timeout=_BLOCK):
        """Publish this rank's blocks of iteration ``t`` (copied; ``send`` may be reused).

        Waits only while some rank has not completed iteration ``t - lag - 1``.
        Iterations are posted strictly in order ``0, 1, 2, ...``.
        """
        if not self._ready:
            self._make_ready()
        array, was_torch = _as_array(send, "send")
        self._core.post(t, array, send_counts, self._timeout(timeout))
        self._slot_torch[t % len(self._slot_torch)] = was_torch

    def complete(self, t, out=None, *, timeout=_BLOCK):
        """Wait until every rank posted ``t``; return ``(recv, recv_counts)`` for this rank.

        Iterations are completed strictly in order, each after its own post.
        If ``out`` is too small, nothing is completed: call again with a
        larger one.
        """
        if not self._ready:
            self._make_ready()
        if out is not None:
            out, _ = _as_array(out, "out")
        recv, counts = self._core.complete(t, out, self._timeout(timeout))
        if self._slot_torch[t % len(self._slot_torch)]:
            import torch
            recv = torch.from_numpy(recv)
        return recv, counts

    def ialltoallv(self, send, send_counts, *, timeout=_BLOCK):
        """Post the next iteration and return a :class:`Request` that completes it."""
        t = self._core.next_post
        self.post(t, send, send_counts, timeout=timeout)
        return Request(self, t)

    def post_views(self, t, send_counts, dtype=np.float32, *, timeout=_BLOCK):
        """Zero-copy post: a context manager giving writable views of iteration ``t``'s record.

        ``with comm.post_views(t, counts, np.float32) as views:`` gives
        ``views[q]``, a 1-D array of ``counts[q]`` elements for rank ``q``,
        lying in shared memory; fill them, and the record is published when
        the block exits normally.  On an exception nothing is published and
        ``post(t)`` may be tried again.
        """
        if not self._ready:
            self._make_ready()
        return _PostViews(self, t, send_counts, dtype, self._timeout(timeout))

    def complete_views(self, t, *, timeout=_BLOCK):
        """Zero-copy complete: a context manager giving read-only views of what arrived.

        ``with comm.complete_views(t) as views:`` gives ``views[s]``, the
        block rank ``s`` posted to this rank for ``t``, in shared memory.
        Leaving the block marks ``t`` completed, after which the senders may
        overwrite those bytes: copy what must outlive the block.
        """
        if not self._ready:
            self._make_ready()
        return _CompleteViews(self, t, self._timeout(timeout))

    def _views(self, blocks, writable):
        views = []
        for offset, count, dtype in blocks:
            view = np.frombuffer(self._mapping, dtype=dtype, count=count, offset=offset)
            if not writable:
                view.flags.writeable = False
            views.append(view)
        return views

    # ------------------------------------------------------------- lifecycle

    def abort(self, reason="aborted by the user"):
        """Abort the communicator: every rank's waiting or next call raises ``CommAborted``."""
        if self._core is not None and not self._core.is_closed:
            self._core.abort(str(reason))

    def close(self):
        """Leave the communicator.  Idempotent.

        Peers that still wait for this rank raise :class:`PeerLostError`.
        Views handed out earlier stay valid memory until they are dropped.
        """
        core, self._core = self._core, None
        if core is None:
            return
        self._closed_core = core  # keep stats readable after close
        try:
            core.close()
        finally:
            for fd in self._pidfds:
                os.close(fd)
            self._pidfds = []
            if not self._ready:
                # We may be the last to attach, or the others may never come:
                # never leave the name behind because this rank gave up.
                segment.unlink(self.name)
            mapping, self._mapping = self._mapping, None
            try:
                mapping.close()
            except BufferError:
                pass  # zero-copy views still use it; it is unmapped when they go

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._core is not None and not self._core.is_closed:
            if self._core.aborted() is None:
                self._core.abort(f"rank {self._core.rank} raised {exc_type.__name__}: {exc}")
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        if self._core is None:
            return f"<blsshm.Comm {self.name} closed>"
        return f"<blsshm.Comm rank {self.rank} of {self.size}, lag {self.lag}>"

    def __reduce__(self):
        raise TypeError("a Comm belongs to one process; pass comm.name and attach in the other process")

    # ------------------------------------------------------------ statistics

    @property
    def stats(self):
        """Counters since creation or :meth:`reset_stats`: iterations, seconds waited
        in post and in complete, futex sleeps, bytes sent and received."""
        core = self._core if self._core is not None else self._closed_core
        return {
            "iterations_posted": core.next_post,
            "iterations_completed": core.next_complete,
            "post_wait_s": core.post_wait_ns / 1e9,
            "complete_wait_s": core.complete_wait_ns / 1e9,
            "futex_sleeps": core.futex_sleeps,
            "bytes_sent": core.bytes_sent,
            "bytes_received": core.bytes_received,
        }

    def reset_stats(self):
        """Zero the waiting and traffic counters."""
        self._core.reset_stats()


class Request:
    """The completion half of :meth:`Comm.ialltoallv`; call :meth:`wait` once, in order."""

    __slots__ = ("_comm", "iteration", "_result")

    def __init__(self, comm, iteration):
        self._comm = comm
        self.iteration = iteration
        self._result = None

    def wait(self, out=None, *, timeout=_BLOCK):
        """Complete the iteration: ``(recv, recv_counts)``.  Repeated calls return the same."""
        if self._result is None:
            self._result = self._comm.complete(self.iteration, out, timeout=timeout)
        return self._result


class _PostViews:
    def __init__(self, comm, t, send_counts, dtype, timeout):
        self._comm = comm
        self._t = t
        self._args = (send_counts, dtype, timeout)

    def __enter__(self):
        send_counts, dtype, timeout = self._args
        _, blocks = self._comm._core.reserve(self._t, send_counts, dtype, timeout)
        dtype = np.dtype(dtype)
        return self._comm._views([(off, n, dtype) for off, n in blocks], writable=True)

    def __exit__(self, exc_type, exc, tb):
        core = self._comm._core
        if exc_type is None:
            core.commit(self._t)
            self._comm._slot_torch[self._t % len(self._comm._slot_torch)] = False
        elif core is not None and not core.is_closed:
            core.cancel(self._t)
        return False


class _CompleteViews:
    def __init__(self, comm, t, timeout):
        self._comm = comm
        self._t = t
        self._timeout = timeout
        self._bytes = 0

    def __enter__(self):
        blocks = self._comm._core.acquire(self._t, self._timeout)
        self._bytes = sum(n * dtype.itemsize for _, n, dtype in blocks)
        return self._comm._views(blocks, writable=False)

    def __exit__(self, exc_type, exc, tb):
        core = self._comm._core
        if core is not None and not core.is_closed:
            core.release(self._t, self._bytes)
        return False
