"""``spawn``: run a function in ``nprocs`` processes sharing one communicator."""
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import numbers
import os
import pickle
import select
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Set

from blsshm import _core, segment
from blsshm._proc import (GRACE_S, TERM_WAIT_S, descendants, describe_exit, die_of, die_with_parent,
                          make_room_for_descriptors, pidfd_exited, signal_pidfds)
from blsshm._core import MAX_RANKS
from blsshm.comm import (DEFAULT_ARENA_BYTES, Comm, _check_int, _check_seconds, _check_spin_us, default_spin_us,
                         liveness_ms, ptracer_policy)
from blsshm.errors import BlsError, BlsTypeError, BlsValueError, CommAborted, RankFailedError, exception_line


class RemoteTraceback(Exception):
    """Carries the traceback of an exception raised in a spawned rank."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def _line_buffered():
    """Make this rank's stdout and stderr write whole lines, unless they are terminals (they are then).

    Block buffered (a pipe, a file), what a rank printed is lost if it is
    killed, after a failure elsewhere; unbuffered, the ranks' lines could
    split mid-line, each print being two writes.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if not stream.isatty():
                # write_through off too: under PYTHONUNBUFFERED it sends a
                # print's text and its newline as two writes.
                stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, OSError, ValueError):  # None, replaced, or closed: leave it
            pass


class _Work:
    """What a rank runs, ``target(rank, *args)``, handed over beside the pipe multiprocessing starts it with.

    Under "spawn", ``start()`` writes the pickled Process to that pipe,
    which the new rank reads only once it has imported the main module: with
    more than a pipe's 64 KiB of arguments ``start()`` waited for that import
    (a Ctrl-C held off meanwhile, see ``_shield_sigint``), and for ever when
    the import failed (under "forkserver" the write failed instead, with a
    bare BrokenPipeError).  So ``target`` and ``args`` are pickled into a
    file of their own, as multiprocessing pickles the Process (with the
    context's reducer, so arguments that pickle only then, a RawArray or a
    Lock, still do), and the pipe carries its descriptor.  The rank unpickles
    them in ``_rank_main``, which reports a failure there (a function it
    cannot import) as its error.  Each rank's file lives until that rank
    has read it, so they may all be in memory at once.  Forked, the rank
    inherits them as they are.
    """

    def __init__(self, target, args, running, ctx):
        self.target, self.args, self.running = target, args, running
        self.reducer = ctx.reducer  # the context's: a program may have set its own (ctx.reducer)
        self.start_method = ctx.get_start_method()  # for errors
        self.pickled = None  # what a rank started by "spawn" or "forkserver" got
        self.fd = -1  # the file of the last pickling: the parent closes it once the rank started

    def __reduce__(self):
        # ``running`` too: pickled apart, a RawArray in ``args`` from the same
        # arena would hand the rank that arena's descriptor twice, which spawn refuses.
        try:
            data = self.reducer.ForkingPickler.dumps((self.target, self.args, self.running),
                                                     pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            raise  # it pickles, only not into this memory
        except Exception as exc:
            raise BlsTypeError(self._unpicklable(exc)) from exc
        self.close()
        self.fd = _file_holding(data)
        return _unpickled_work, (self.reducer.DupFd(self.fd),)

    def _unpicklable(self, exc):
        """Which of the caller's arguments did not pickle, and why, for the error raised instead."""
        if self.target is _with_comm:  # spawn's: _with_comm(rank, fn, name, comm_kwargs, args)
            fn, _, _, args = self.args
            parts = [("fn", fn)] + [(f"args[{i}]", a) for i, a in enumerate(args)]
        else:
            parts = [("target", self.target)] + [(f"args[{i}]", a) for i, a in enumerate(self.args)]
        advice = "start ranks by 'fork'"
        for label, part in parts:
            try:
                self.reducer.ForkingPickler.dumps(part, pickle.HIGHEST_PROTOCOL)
            except Exception as part_exc:
                label, exc = f"{label} ({type(part).__name__})", part_exc
                if callable(part):
                    advice = "define it at module level, not as a lambda or inside a function, or " + advice
                break
        else:
            label = "the ranks' work"
        return (f"{label} does not pickle, and ranks started by {self.start_method!r} "
                f"get it pickled: {type(exc).__name__}: {exc} ({advice})")

    def load(self):
        """``(target, args, running)``, once: the pickled bytes are dropped, not kept beside the arguments."""
        if self.pickled is None:
            return self.target, self.args, self.running
        data, self.pickled = self.pickled, None
        return pickle.loads(data)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _file_holding(data):
    """A descriptor of an unnamed file holding ``data``."""
    try:
        fd = os.memfd_create("blsshm-rank-work", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd: a temporary file, unlinked at once
        fd, path = tempfile.mkstemp(prefix="blsshm-rank-work-")
        os.unlink(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unpickled_work(dup_fd):
    """The rank's side of ``_Work.__reduce__``: the pickled bytes, read now, unpickled in ``_rank_main``."""
    fd = dup_fd.detach()
    try:
        size = os.fstat(fd).st_size
        parts = []
        offset = 0
        while offset < size:  # pread: the file's offset is shared with the parent's descriptor
            parts.append(os.pread(fd, size - offset, offset))
            if not parts[-1]:
                break
            offset += len(parts[-1])
    finally:
        os.close(fd)
    work = _Work.__new__(_Work)
    work.target = work.args = work.running = work.reducer = None
    work.pickled, work.fd = b"".join(parts), -1
    return work


def _rank_main(work, rank, conn, parent_pid, sigint_handler, parents_ends, forked):
    for fd in parents_ends:  # forked: the parent's ends of the report pipes (see _run_ranks)
        os.close(fd)
    die_with_parent(parent_pid)()
    _default_termination_signals()  # a forked rank inherited the parent's (see _run_ranks)
    _line_buffered()
    try:
        # Still starting: a Ctrl-C is ignored here under "fork" and "spawn"
        # (see _shield_sigint); a fork server's child raises it, and reports it.
        target, args, running = work.load()
        if forked:
            _one_torch_thread()
        if sigint_handler is not None:  # shielded from Ctrl-C while starting (see _shield_sigint)
            signal.signal(signal.SIGINT, _noting_sigint(sigint_handler, running, rank))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked, if forked
        running[rank] = RUNNING  # from now on a terminal's Ctrl-C reaches ``target``
        result = target(rank, *args)
        try:
            # Plain pickle, not conn.send's ForkingPickler: torch registers
            # reducers there that send a tensor as a handle to this process's
            # memory, which is gone once the rank exits.
            payload = pickle.dumps(("ok", result), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # say it is the result, not the function, that failed
            raise RankFailedError(f"rank {rank} returned a {type(result).__name__} that cannot be "
                                  f"pickled back to the parent: {type(exc).__name__}: {exc}",
                                  rank=rank) from exc
        _send_report(conn, payload)
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        _ignore_sigint()  # first: a KeyboardInterrupt while the report is made would lose it
        _send_report(conn, _error_report(exc, rank, traceback.format_exc()))
    finally:
        conn.close()


def _one_torch_thread():
    """In a rank forked from a process that imported torch: one intra-op thread for torch.

    torch's OpenMP thread pool does not survive a fork: once the parent has
    run a parallel op, a forked child's first one waits forever for threads
    that exist only in the parent.  On one thread torch runs ops inline, so
    they never wait.  It is also what ``python -m blsshm.run`` (as torchrun)
    gives each of several ranks, which would oversubscribe the cores with a
    thread per core each.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


#: A report's frame on the pipe: its length, then its bytes (see _Report).
_REPORT_HEADER = struct.Struct("!Q")


def _ignore_sigint():
    """Ctrl-C does nothing in this process from now on (a rank's last act is its report).

    Ignored, not only blocked: a block holds for the calling thread, and the
    kernel hands a Ctrl-C to another thread (a forkserver rank's watcher,
    torch's), whose handler Python then runs in the main thread all the
    same.  One that arrived before is too late to interrupt anything now.
    """
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # raised as the call returned: it arrived just before
        pass


def _send_report(conn, payload):
    """Write ``payload`` to the parent, framed by its length (read by ``_Report``): the rank's last act.

    Ctrl-C is ignored from here on: a KeyboardInterrupt raised part-way
    through a large report (its writes wait for the parent to read) would
    send the error report into the middle of this one.  A parent that no
    longer reads (it was stopped, and stops us) is not an error of ours.
    """
    _ignore_sigint()
    fd = conn.fileno()
    try:
        for part in (_REPORT_HEADER.pack(len(payload)), payload):
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass


class _Report:
    """A rank's report (framed by ``_send_report``) as it arrives on the parent's end of its pipe.

    Read only as the pipe has bytes, never waiting for the rest: a rank
    stopped (or killed, while a process it forked holds the pipe open)
    part-way through a large report must hold up neither the other ranks'
    reports nor the grace period after a failure.
    """

    def __init__(self, fd):
        self._fd = fd
        os.set_blocking(fd, False)  # the read end is the parent's alone: the ranks write blocking
        self._header = bytearray(_REPORT_HEADER.size)
        self._body: Optional[bytearray] = None
        self._unread = memoryview(self._header)

    def read(self):
        """Read what the pipe holds now; True once the report is whole, EOFError if the pipe ended first."""
        while self._unread:
            try:
                got = os.readv(self._fd, [self._unread])
            except BlockingIOError:
                return False
            if got == 0:
                raise EOFError
            self._unread = self._unread[got:]
            if not self._unread and self._body is None:
                self._body = bytearray(_REPORT_HEADER.unpack(self._header)[0])
                self._unread = memoryview(self._body)
        return True

    def value(self):
        """The whole report, unpickled."""
        assert self._body is not None and not self._unread
        try:
            return pickle.loads(self._body)
        except EOFError as exc:  # a frame that arrived whole but holds too little: not the pipe's end
            raise pickle.UnpicklingError(f"a report of {len(self._body)} bytes ends early") from exc


#: States of a rank in ``_run_ranks``'s shared ``running`` array.
RUNNING = 1        # running ``target``: a Ctrl-C reaches it
GOT_SIGINT = 2     # and its SIGINT handler has run once at least
#: How long a Ctrl-C to the parent waits for the ranks' handlers to show
#: theirs before it is passed on to the ranks that showed none.
SIGINT_SEEN_WAIT_S = 0.1


def _noting_sigint(handler, running, rank):
    """``handler`` (a rank's SIGINT handler), made to note first that the rank got one.

    The parent then knows whether a Ctrl-C it got reached the ranks too (a
    terminal's, sent to the process group) or not (``kill -INT`` of the
    parent, a notebook's interrupt), and passes it on only in that case.
    """
    if not callable(handler):
        return handler

    def noting(signum, frame):
        running[rank] = GOT_SIGINT
        return handler(signum, frame)
    return noting


def _pass_on_sigint(pidfds, running):
    """Send SIGINT to the ranks running ``target`` whose handlers showed no Ctrl-C within SIGINT_SEEN_WAIT_S.

    A rank busy in a long C call runs its handler late and may get a
    second SIGINT (Python merges it with the first unless the first was
    already handled), or one that replaced our handler gets one it had.
    """
    deadline = time.monotonic() + SIGINT_SEEN_WAIT_S
    while any(running[r] == RUNNING for r in range(len(pidfds))) and time.monotonic() < deadline:
        time.sleep(0.005)
    signal_pidfds([fd for r, fd in enumerate(pidfds) if running[r] == RUNNING and fd >= 0], signal.SIGINT)


#: Signals that end a process by default: a service manager's or ``docker
#: stop``'s SIGTERM, or ``kill``'s, may reach the parent alone.
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Terminated(BaseException):
    """A termination signal arrived while ranks ran (see ``_stopping_ranks_on_termination``)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _TerminationHandler:
    """The handler of the termination signals while ranks run: notes the first and raises ``_Terminated`` once.

    Once: a second one (a closed terminal's SIGHUP after a SIGTERM) must
    not cut the clean-up the first started short; the process ends anyway.
    While ``holding`` (ranks starting: one raised inside a start would leave
    a process outside ``procs``) it only notes it, for ``_holding_termination``
    to raise.  No signal mask: a helper started meanwhile (the fork server,
    the resource tracker) would keep it, and other threads would still get
    the signal.  In a process forked meanwhile (a rank before it resets
    the handler, or a child another thread forked) it is the default action.
    """

    def __init__(self):
        self.pid = os.getpid()
        self.received = None
        self.holding = False

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = signum
            if not self.holding:
                raise _Terminated(signum)


@contextlib.contextmanager
def _holding_termination(handler):
    """While ranks start, a termination signal is only noted; raised once they are all in ``procs``."""
    if handler is None:
        yield
        return
    handler.holding = True
    try:
        yield
    finally:
        handler.holding = False
    if handler.received is not None:
        raise _Terminated(handler.received)


def _default_termination_signals():
    """In a rank forked with our handler: the default action back."""
    for signum in TERMINATION_SIGNALS:
        if isinstance(signal.getsignal(signum), _TerminationHandler):
            signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def _stopping_ranks_on_termination():
    """While ranks run, end this process on SIGTERM or SIGHUP only once they are stopped and cleaned up.

    At their default, these signals ended the parent at once: the ranks
    then died of their parent-death SIGKILL, with no chance to act, and
    what they started (DataLoader workers) ran on.  Now the first one
    raises ``_Terminated`` here; the clean-up stops each rank with what it
    started (SIGTERM at once, without the grace period, SIGKILL 2 s later)
    and removes the segment, and then the process dies of the signal at
    its default action, so its exit status says what ended it, whatever
    else was raised meanwhile.  A handler the program installed, or
    SIG_IGN, is left alone: it decides.  Only in the main thread, where
    handlers run.  Yields the handler, for ``_run_ranks`` (None if not
    installed).
    """
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    handler = _TerminationHandler()
    ours = []
    try:  # from here: one that comes while the handler is being installed is handled too
        for signum in TERMINATION_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, handler)
                ours.append(signum)
        yield handler if ours else None
    except _Terminated:
        pass  # what it says is in handler.received
    finally:
        handler.holding = True  # one that comes while the defaults are restored is only noted
        for signum in ours:
            signal.signal(signum, signal.SIG_DFL)
        if handler.received is not None:
            die_of(handler.received)


def _portable(exc, rank):
    """``exc`` as the parent should get it: one that survives pickling, and no ``SystemExit``.

    An exception whose constructor takes other arguments than its ``args``
    pickles but does not unpickle; it is sent as a BlsError naming it.  A
    rank's ``sys.exit()`` must not end the parent silently.
    """
    if isinstance(exc, SystemExit):
        return RankFailedError(f"rank {rank} called sys.exit({exc.code!r}) instead of returning", rank=rank)
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return BlsError(exception_line(exc, qualified=True))


def _error_report(exc, rank, tb):
    """What a rank sends when it failed: the exception pickled on its own, with its name and traceback as text.

    The parent may not be able to unpickle it (its class is in a module
    only the rank imported): it still gets the name, message and traceback.
    """
    exc = _portable(exc, rank)
    return pickle.dumps(("error", pickle.dumps(exc, pickle.HIGHEST_PROTOCOL), type(exc).__name__, exception_line(exc, qualified=True),
                         tb), pickle.HIGHEST_PROTOCOL)


def _received_error(report):
    """The exception of a rank's error report, or a BlsError naming it if it does not unpickle here."""
    _, exc_bytes, _, description, tb = report
    try:
        exc = pickle.loads(exc_bytes)
    except Exception as err:
        exc = BlsError(f"{description} (the exception does not unpickle here: {type(err).__name__}: {err})")
    return exc, tb


def _with_comm(rank, fn, name, comm_kwargs, args):
    with Comm.attach(name, rank, **comm_kwargs) as comm:
        return fn(comm, *args)


def spawn(fn: Callable[..., Any], nprocs: int, *, lag: int = 0, arena_bytes: int = DEFAULT_ARENA_BYTES,
          args: Sequence[Any] = (), timeout: Optional[float] = None, spin_us: Optional[float] = None,
          start_method: Optional[str] = None, grace: float = GRACE_S) -> List[Any]:
    """Run ``fn(comm, *args)`` in ``nprocs`` new processes; return their results in rank order.

    Every process gets a :class:`Comm` of ``nprocs`` ranks at lag ``lag``.
    If a rank raises, its exception is re-raised here (with the rank and the
    remote traceback attached) once the others have stopped; a rank that
    dies without raising gives :class:`RankFailedError`.  After the first
    failure the others get ``grace`` seconds to stop (they raise
    :class:`CommAborted`, or its subclass :class:`PeerLostError` if the
    failed rank died or exited instead of raising, at once even if it never
    attached), then SIGTERM, and SIGKILL 2 s later, each with the processes
    it started (``grace=math.inf`` lets them take as long as they need).
    A Ctrl-C (which a terminal sends the ranks too; one sent to this
    process alone is passed on to them) gives them
    ``grace`` seconds to act on it, then raises here; a second one kills
    them at once.  SIGTERM or SIGHUP to this process, if it left them at
    their default and calls from the main thread, first stops the ranks
    (SIGTERM, without the grace period; SIGKILL 2 s later) with what they
    started and removes the segment, then ends it as they would have.
    Processes are always reaped and the segment always removed, whatever
    happens; what a rank that returned normally, or died on its own (of
    the OOM killer's SIGKILL, say: what it started is orphaned then, and
    no longer found as its), started itself and left running is its own
    (unlike under ``python -m blsshm.run``, which ends each rank's whole
    process group).  A rank's stdout and stderr write whole lines
    (line buffered), so what it printed survives its being stopped.
    ``timeout`` is the communicator's default wait timeout;
    ``start_method`` is a multiprocessing start method (default: the
    platform's).  ``fn`` and ``args`` must be picklable for ``"spawn"``
    and ``"forkserver"``.  Ranks forked (``"fork"``, Linux's default)
    from a process that imported torch start with
    ``torch.set_num_threads(1)``: torch's thread pool does not survive a
    fork, and once this process has run a parallel op a rank's first one
    would wait forever for it.  ``fn`` may ask for more threads only if
    this process ran no torch op; ranks started by ``"forkserver"`` or
    ``"spawn"`` have torch's own default.
    """
    if not callable(fn):
        raise BlsTypeError(f"fn must be callable, got {type(fn).__name__}")
    nprocs = _check_nprocs(nprocs)
    grace = _check_grace(grace)
    args = _check_args(args)
    ctx = _context(start_method)
    # The ranks check these again when they attach; here a bad one starts nobody.
    _check_seconds("timeout", timeout)
    _check_spin_us(default_spin_us() if spin_us is None else spin_us)
    liveness_ms()
    ptracer_policy()
    with _stopping_ranks_on_termination() as termination:
        return _spawn_with_segment(fn, nprocs, lag, arena_bytes, args, timeout, spin_us, ctx, grace, termination)


def _spawn_with_segment(fn, nprocs, lag, arena_bytes, args, timeout, spin_us, ctx, grace, termination):
    """:func:`spawn` with checked arguments: makes the segment, runs the ranks, removes it."""
    name = segment.create(nprocs, _check_int("lag", lag), _check_int("arena_bytes", arena_bytes), reaped=True)
    observer = None
    try:
        observer = segment.open_mapping(name)

        def abort_if_unattached(rank, why):
            # A rank that failed before attaching would leave the others
            # waiting for it until the grace period ends; abort them now.
            # Does nothing for a rank that attached: its peers watch it.
            _core.abort_unattached(observer, rank, f"{why} without attaching")

        comm_kwargs = dict(timeout=timeout, spin_us=spin_us)
        return _run_ranks(_with_comm, nprocs, (fn, name, comm_kwargs, args), ctx, grace,
                          abort_if_unattached, termination)
    finally:
        if observer is not None:
            observer.close()
        segment.unlink(name)


def _check_args(args):
    """``args`` as a tuple; a str would be spread into characters, anything else unpacked late."""
    if isinstance(args, (str, bytes)) or not isinstance(args, (tuple, list)):
        raise BlsTypeError(f"args must be a tuple or list of fn's extra arguments, got {type(args).__name__}")
    return tuple(args)


def run_ranks(target: Callable[..., Any], nprocs: int, *, args: Sequence[Any] = (),
              start_method: Optional[str] = None, grace: float = GRACE_S) -> List[Any]:
    """Run ``target(rank, *args)`` in ``nprocs`` new processes, with no communicator.

    The process half of :func:`spawn`, for programs that bring their own
    transport (a torch.distributed comparison, say): results in rank order,
    the root-cause failure re-raised with its rank, every process reaped
    (also on SIGTERM or SIGHUP, as :func:`spawn`).
    """
    if not callable(target):
        raise BlsTypeError(f"target must be callable, got {type(target).__name__}")
    nprocs = _check_nprocs(nprocs)
    grace = _check_grace(grace)
    args = _check_args(args)
    ctx = _context(start_method)
    with _stopping_ranks_on_termination() as termination:
        return _run_ranks(target, nprocs, args, ctx, grace, None, termination)


def _context(start_method):
    """The multiprocessing context of ``start_method`` (None: the platform's default); a clear error if none."""
    if start_method is not None and not isinstance(start_method, str):
        raise BlsTypeError(f"start_method must be a str or None, got {type(start_method).__name__}")
    try:
        ctx: Any = multiprocessing.get_context(start_method)  # typeshed's BaseContext has no Process
    except ValueError:
        raise BlsValueError(f"start_method must be one of {multiprocessing.get_all_start_methods()} or None, "
                            f"got {start_method!r}") from None
    return ctx


def _run_ranks(target, nprocs, args, ctx, grace, on_failure, termination):
    """:func:`run_ranks` with checked arguments; ``on_failure(rank, why)`` hears of each failed rank,
    ``termination`` (a ``_TerminationHandler`` or None) of SIGTERM and SIGHUP."""
    make_room_for_descriptors(nprocs, FDS_PER_RANK, FDS_SPARE)
    procs: List[Any] = []
    conns: List[Any] = []
    pidfds: List[int] = []
    reported: Set[int] = set()  # ranks whose outcome arrived (filled by _collect)
    running = ctx.RawArray("b", nprocs)  # 1 once a rank runs ``target`` (Ctrl-C no longer shielded)
    work = _Work(target, args, running, ctx)
    interrupted = False
    forked = ctx.get_start_method() == "fork"
    with _reaping_our_children():  # the ranks' exit statuses are ours to collect
        try:
            with _shield_sigint(ctx) as sigint_handler, _holding_termination(termination):
                for rank in range(nprocs):
                    parent_end, child_end = ctx.Pipe(duplex=False)
                    # A forked rank inherits our ends of its pipe and of the earlier
                    # ranks': it closes them, so that a rank still writing its report
                    # once we close ours (finally, below) gets EPIPE, not a wait.
                    parents_ends = [c.fileno() for c in conns] + [parent_end.fileno()] if forked else []
                    # Not a daemon, so a rank may start processes of its own (DataLoader
                    # workers); the finally below reaps every rank in any case.
                    proc = ctx.Process(target=_rank_main, name=f"blsshm-rank-{rank}",
                                       args=(work, rank, child_end, os.getpid(), sigint_handler, parents_ends,
                                             forked))
                    try:
                        proc.start()
                    finally:
                        work.close()  # the rank has its own descriptor of the file (if pickled)
                    # Now, while it cannot have been reaped: the next start() reaps
                    # the children that exited, and a pid then names nobody, or another.
                    pidfds.append(_pidfd(proc))
                    child_end.close()
                    procs.append(proc)
                    conns.append(parent_end)
            return _collect(procs, conns, pidfds, grace, reported, on_failure)
        except KeyboardInterrupt:
            # Raised in _collect, or as the starts ended (it waited blocked).
            # A terminal's Ctrl-C reached the ranks too (our process group):
            # those running ``target`` get ``grace`` to act on it, as the
            # launcher's get theirs.  One still starting ignored it: stopped now.
            # One that reached only us is passed on to them.
            interrupted = True
            _pass_on_sigint(pidfds, running)
            raise
        finally:
            # Terminated (even if a Ctrl-C's KeyboardInterrupt replaced the
            # exception): no grace period, whoever sent it will not wait long.
            terminated = termination is not None and termination.received is not None
            let_finish = reported | ({r for r in range(len(procs)) if running[r]} if interrupted else set())
            try:
                # Nothing reads the ranks' reports any more: one still writing
                # (a large result, or its error after a Ctrl-C) gets EPIPE and
                # ends (see _send_report), rather than waiting out the grace period.
                for conn in conns:
                    conn.close()
                _stop_ranks(procs, pidfds, let_finish, 0.0 if terminated else grace)
            except _Terminated:  # during the grace period: the ranks are stopped now, SIGTERM first
                _stop_ranks(procs, pidfds, set(), 0.0)
                raise
            except BaseException:
                # A second Ctrl-C while we waited for them means "now" (as in the
                # launcher): no rank may outlive the call, the caller may live on.
                _stop_ranks(procs, pidfds, set(), 0.0, signal.SIGKILL)
                raise
            finally:
                for fd in pidfds:
                    if fd >= 0:
                        os.close(fd)
                # Their pipes (multiprocessing's sentinels) now: the exception
                # raised here keeps ``procs`` in its traceback, and a program
                # that retried failing runs with gc off ran out of descriptors.
                for proc in procs:
                    with contextlib.suppress(ValueError):  # not reaped (a second Ctrl-C): its finalizer closes it
                        proc.close()


#: Descriptors this process holds per rank while they run: the result
#: pipe's end, a pidfd, and the two pipe ends multiprocessing keeps (30 ranks
#: peaked at 4.07 each); a few more while one starts.
FDS_PER_RANK = 4
FDS_SPARE = 8


@contextlib.contextmanager
def _reaping_our_children():
    """SIGCHLD at its default while the ranks run: ignored, the kernel reaps them
    behind our back, and a rank's exit status (its signal) is lost, its pid free for others."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        # The caller's other children that ended meanwhile are zombies, which
        # restoring SIG_IGN does not reap: reap them, as it asked the kernel to.
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass


def _stop_ranks(procs, pidfds, let_finish, grace, signum=signal.SIGTERM):
    """Send ranks not in ``let_finish`` ``signum`` now, the others if still running after ``grace``;
    SIGKILL TERM_WAIT_S later; reap all.

    A rank stopped so is stopped with the processes it started (they would
    outlive it, as the launcher's never do), and they get as long.
    """
    started = []  # pidfds of what the stopped ranks started: ours to close, whatever happens
    try:
        everyone = range(len(procs))
        # The others at once: one still starting up must not get as far as
        # its work while those given ``grace`` use it.
        _signal_trees(procs, pidfds, [r for r in everyone if r not in let_finish], signum, started)
        # A rank that reported may still be exiting (flushing its output).
        _wait_ranks(procs, pidfds, let_finish, time.monotonic() + grace)
        _signal_trees(procs, pidfds, let_finish, signum, started)
        deadline = time.monotonic() + TERM_WAIT_S
        _wait_ranks(procs, pidfds, everyone, deadline)
        _wait_pidfds(started, deadline)
        for r in everyone:
            _signal_rank(procs[r], pidfds[r], signal.SIGKILL)
        signal_pidfds(started, signal.SIGKILL)
        _wait_ranks(procs, pidfds, everyone, math.inf)  # SIGKILLed: gone at once
        for proc in procs:
            proc.join()  # reaps it (a fork server's child: its status, if the server still lives)
    except BaseException:  # a second Ctrl-C: what the ranks started goes now (the caller kills them)
        signal_pidfds(started, signal.SIGKILL)
        raise
    finally:
        for fd in started:
            os.close(fd)


def _signal_trees(procs, pidfds, ranks, signum, started):
    """Send ``signum`` to each of the ranks ``ranks`` still running and to what it started (pidfds into ``started``)."""
    first = len(started)  # those before were signalled already
    for r in ranks:
        if _rank_alive(procs[r], pidfds[r]):
            # First, while the rank still holds them as its children.  Its
            # pidfd tells whether its pid was still its (a fork server's child
            # is reaped by the server, or by init once the server is gone).
            descendants(procs[r].pid, started, pidfds[r])
            _signal_rank(procs[r], pidfds[r], signum)
    signal_pidfds(started[first:], signum)


def _rank_alive(proc, pidfd):
    """Whether the rank ``proc`` (pidfd ``pidfd``, -1 if none) still runs.

    Through its pidfd where there is one: under forkserver, multiprocessing
    learns of a rank from the fork server, and once the server is gone (a
    SIGTERM to the whole process group) it takes every rank for dead and
    signals none, though they run on.
    """
    return not pidfd_exited(pidfd) if pidfd >= 0 else proc.is_alive()


def _signal_rank(proc, pidfd, signum):
    """Send ``signum`` (SIGTERM or SIGKILL) to the rank ``proc`` if it still runs."""
    if pidfd >= 0:
        signal_pidfds([pidfd], signum)
    elif proc.is_alive():
        proc.kill() if signum == signal.SIGKILL else proc.terminate()


def _wait_ranks(procs, pidfds, ranks, deadline):
    """Wait until the ranks ``ranks`` have exited, or ``deadline`` (monotonic) passes.

    Through their pidfds where there are: ``Process.join`` with a timeout
    waits for multiprocessing's sentinel, a pipe that processes the rank
    forked hold open after it exited (see ``_collect``).
    """
    _wait_pidfds([pidfds[r] for r in ranks if pidfds[r] >= 0], deadline)
    for r in ranks:
        if pidfds[r] < 0:
            procs[r].join(_left(deadline))


def _wait_pidfds(fds, deadline):
    """Wait until every process of ``fds`` has exited, or ``deadline`` (monotonic) passes."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)  # readable once the process has exited
    left = set(fds)
    while left:
        ms = -1 if deadline == math.inf else int(max(0.0, deadline - time.monotonic()) * 1000)  # -1: no bound
        events = poller.poll(ms)
        if not events:
            return
        for fd, _ in events:
            poller.unregister(fd)
            left.discard(fd)


@contextlib.contextmanager
def _shield_sigint(ctx):
    """Start ranks ignoring SIGINT; yields the handler they restore in ``_rank_main`` (or None).

    A terminal's Ctrl-C reaches the ranks too (they share our process
    group).  One still starting up (importing, unpickling its arguments)
    would die printing a traceback; ignoring it there, it leaves the
    Ctrl-C to us, and we stop it.  SIG_IGN, unlike a handler, survives the
    exec of the "spawn" start method.  Meanwhile SIGINT is blocked here,
    not ignored, so a Ctrl-C to this process waits instead of being lost.
    """
    handler = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()  # signal.signal needs it
            or handler in (signal.SIG_IGN, None)):
        yield None
        return
    method = ctx.get_start_method()
    if method == "forkserver":  # started now, the server (and every child of it) would ignore SIGINT
        multiprocessing.forkserver.ensure_running()
    elif method == "spawn":
        # The first start would start the resource tracker, which unblocks
        # SIGINT as it returns: a Ctrl-C during the other starts was lost.
        multiprocessing.resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # A forked rank keeps our handler, as before; a new interpreter has Python's default.
        yield handler if method == "fork" else signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a Ctrl-C meanwhile arrives now


def _check_nprocs(nprocs):
    _check_int("nprocs", nprocs)
    if not 1 <= nprocs <= MAX_RANKS:
        raise BlsValueError(f"nprocs must be between 1 and {MAX_RANKS}, got {nprocs!r}")
    return int(nprocs)


#: A grace period longer than this waits for ever (the waits' own limits are near 25 days).
MAX_GRACE_S = 1e6


def _check_grace(grace):
    """``grace`` in seconds, ``math.inf`` for no bound; checked before any process starts
    (a bad one skipped the clean-up)."""
    if isinstance(grace, bool) or not isinstance(grace, numbers.Real):
        raise BlsTypeError(f"grace must be a number of seconds, got {grace!r}")
    if not grace >= 0:
        raise BlsValueError(f"grace must be >= 0, got {grace}")
    try:
        seconds = float(grace)
    except OverflowError:  # an int past any float
        return math.inf
    return math.inf if seconds > MAX_GRACE_S else seconds


def _left(deadline):
    """The timeout argument of a wait until ``deadline`` (monotonic): None when it is ``math.inf``."""
    return None if deadline == math.inf else max(0.0, deadline - time.monotonic())


def _collect(procs, conns, pidfds, grace, reported, on_failure):
    """Gather every rank's outcome into ``reported``; after the first failure wait at most ``grace`` s.

    A rank's outcome is its report on its pipe, or its end: the pipe's EOF,
    or the process's exit before the report was whole, since a process the
    rank forked may hold the pipe open long after the rank died.  Its exit
    is watched through a pidfd: multiprocessing's own sentinel is a pipe
    that such a process holds open too.  Reports are read as they arrive,
    all at once, so a rank slow to write a large one delays no other's.
    """
    n = len(procs)
    outcome = [None] * n
    failures = []  # (rank, exception, traceback) in the order they arrived
    reports = [_Report(conn.fileno()) for conn in conns]
    pending = {conns[r]: r for r in range(n)}
    exits = [procs[r].sentinel if pidfds[r] < 0 else pidfds[r] for r in range(n)]
    pending.update({exits[r]: r for r in range(n)})
    deadline = None
    while pending:
        wait_s = None if deadline is None else _left(deadline)
        ready = multiprocessing.connection.wait(list(pending), timeout=wait_s)
        if not ready:
            break  # grace period over: the finally of spawn kills what is left
        for handle in ready:
            r = pending.get(handle)
            if r is None:
                continue  # its pipe and its exit were both ready: done already
            # An exit ends the report: every byte the rank wrote was in the
            # pipe before it exited (its writes had returned), and is read now.
            exited = handle is not conns[r]
            try:
                whole = reports[r].read()
            except EOFError:
                whole = False
                if not exited:
                    # The pipe ended short of a report, but the rank may run on
                    # (it closed the pipe): its exit decides, as other ranks'
                    # outcomes and the grace period go on being heard.
                    del pending[conns[r]]
                    continue
            if not (whole or exited):
                continue  # more to come
            pending.pop(conns[r], None)
            del pending[exits[r]]
            if not whole:
                procs[r].join()
                exc = RankFailedError(
                    f"rank {r} ended without a result ({describe_exit(procs[r].exitcode)})", rank=r)
                failures.append((r, exc, None))
                if on_failure is not None:
                    on_failure(r, f"it ended ({describe_exit(procs[r].exitcode)})")
                continue
            try:
                outcome[r] = reports[r].value()
            except Exception as exc:  # a result that pickled but does not unpickle here
                reported.add(r)
                failures.append((r, RankFailedError(
                    f"rank {r}'s result could not be unpickled: {type(exc).__name__}: {exc}", rank=r), None))
                continue
            reported.add(r)
            if outcome[r][0] == "error":
                error, tb = _received_error(outcome[r])
                failures.append((r, error, tb))
                if on_failure is not None:  # its own class, even if it does not unpickle here
                    on_failure(r, f"it raised {outcome[r][2]}")
        if failures and deadline is None:
            deadline = time.monotonic() + grace
    if failures:
        _reraise(failures)
    missing = [r for r in range(n) if outcome[r] is None]
    if missing:
        raise RankFailedError(f"rank(s) {missing} did not finish", rank=missing[0])
    return [outcome[r][1] for r in range(n)]


def _pidfd(proc):
    """A pidfd of ``proc`` (readable once it exited; the caller closes it), or -1 without pidfds."""
    try:
        return os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        return -1


def _reraise(failures):
    # The root cause is the first failure that is not a reaction to another
    # rank's failure (CommAborted / PeerLostError follow a failure elsewhere).
    causes = [f for f in failures if not isinstance(f[1], CommAborted)]
    if not causes:
        # Every rank raised the abort, the rank that called abort() too: its
        # failure is the one to show (the others' arrived first), as
        # python -m blsshm.run names it.
        aborter = failures[0][1].rank
        causes = [f for f in failures if f[0] == aborter]
    rank, exc, tb = (causes or failures)[0]
    if tb is not None:
        exc.__cause__ = RemoteTraceback(tb)
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in blsshm rank {rank}")
    exc.blsshm_rank = rank
    raise exc
