"""``python -m blsshm.run -n N [--lag L] [--arena-bytes B] [--tag-output] script.py [args]``

Starts N copies of a script (or ``-m module``) as the ranks of one
communicator, like ``torchrun``: each finds its rank through
:func:`blsshm.init` (and, as under torchrun, in ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``; ``OMP_NUM_THREADS=1`` too, when
there are several ranks and it is not set).  If a rank fails, the others get a
few seconds to notice (they raise ``CommAborted``, or its subclass
``PeerLostError`` if the rank died or exited instead of raising in its
``with blsshm.init()`` block); ranks still running
then get SIGTERM, and SIGKILL 2 s later.  The exit status is that of the
rank that failed first (not of one the launcher stopped so); if ranks die of
a signal passed on to them (below), the launcher dies of it too, as a shell
expects of an interrupted program.  A rank that exits without attaching
aborts the communicator, so the others do not wait for it.  The segment is
removed in every case.

Each rank leads a process group of its own: a terminal's Ctrl-C reaches the
launcher alone, which passes it on once to every rank's group, and at the end
whatever a rank started is killed with it.  A second Ctrl-C (or SIGTERM)
kills the ranks at once, and so does the launcher itself if ranks are still
running ``--stop-timeout`` seconds after the first (they may ignore it, or
be stuck in a C call); a rank failing of it starts no ``--grace`` period.  SIGHUP is passed on the same way, and SIGQUIT too,
but a rank dumping core on it is never cut short.
Ranks read no terminal (stdin is /dev/null then; a pipe or file is shared
by all ranks): outside the terminal's
foreground group a read would stop them, and a rank stopped so (by opening
``/dev/tty``, say) is killed and named rather than waited for.

Ctrl-Z stops the ranks with the launcher, and ``fg``/``bg`` continues them.
Ranks run with the launcher's interpreter flags (``python -O -m
blsshm.run ...`` runs them with ``-O``; under ``-I`` or ``-P``, as for
``python -I script.py``, the script's directory is not on ``sys.path``).
Ranks write unbuffered to a pipe or file (``PYTHONUNBUFFERED=1`` unless
set, ``-u`` under ``-E`` or ``-I``), as under torchrun's ``python -u``:
what a rank printed survives its being killed; unbuffered, a print is two
writes (text, newline), so the lines of ranks printing at once can split
mid-line (``--tag-output`` passes whole lines).  Time stopped by Ctrl-Z counts against no deadline.

With ``--tag-output`` every line a rank writes starts with ``[rank N]`` (its
stdout to the launcher's stdout, its stderr to its stderr, whole lines at a
time), so the tracebacks of several ranks cannot interleave mid-line.  A
line over 1 MiB is passed on in pieces as it comes, prefixed once (another
rank's line may then fall between them).  If the launcher's stdout cannot
be written (a full disk), it says so and drops the rest, and a run that
would have exited with 0 exits with 120.
"""
import argparse
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

from blsshm import _core, segment
from blsshm._proc import (GRACE_S, STOP_TIMEOUT_S, TERM_WAIT_S, describe_exit, die_of, die_with_parent,
                          make_room_for_descriptors)
from blsshm.comm import DEFAULT_ARENA_BYTES, default_spin_us, liveness_ms, ptracer_policy
from blsshm.errors import BlsError

ENV_NAME, ENV_RANK, ENV_SIZE = "BLSSHM_NAME", "BLSSHM_RANK", "BLSSHM_SIZE"
ENV_LAUNCHER = "BLSSHM_LAUNCHER_PID"  # the ranks' parent: init() tells a rank's own children by it
# What torchrun sets, for programs that read their rank before init() (one
# host: local and global ranks are the same).
TORCHRUN_RANK, TORCHRUN_SIZE = ("RANK", "LOCAL_RANK"), ("WORLD_SIZE", "LOCAL_WORLD_SIZE")
# Passed on to the ranks (unless ignored when the launcher started, as under
# nohup): without a handler SIGHUP (a closed terminal) and SIGQUIT (Ctrl-\)
# would end the launcher before its clean-up, leaving the segment behind.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: Descriptors the launcher holds per rank under --tag-output (the read ends
#: of its stdout and stderr pipes), and at most while it starts one (both
#: pipes whole, subprocess's error pipe).
TAGGED_FDS_PER_RANK = 2
START_FDS = 8

TERMINAL_STOPS = {signal.SIGTTIN: "read from", signal.SIGTTOU: "wrote to"}  # what stops a rank
RELAY_CHUNK = 1 << 16     # bytes read at once
RELAY_LINE_MAX = 1 << 20  # the longest line held back for its newline (a longer one goes in pieces)
OUTPUT_LOST_STATUS = 120  # the run's status when the ranks' output could not be written (as python's)
RELAY_DRAIN_S = 2.0       # after the ranks' groups are killed, how long output may still arrive


def _unbuffered_output(opts):
    """Whether the ranks write unbuffered: to a pipe or a file (see the module docstring)."""
    return opts.tag_output or not os.isatty(1)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m blsshm.run",
        description="Run a program as N ranks of one blsshm communicator.")
    p.add_argument("-n", "--nprocs", type=int, required=True, help="number of ranks")
    p.add_argument("--lag", type=int, default=0, help="lag bound L (default 0: synchronous)")
    p.add_argument("--arena-bytes", type=int, default=DEFAULT_ARENA_BYTES,
                   help=f"room per rank for in-flight records (default {DEFAULT_ARENA_BYTES})")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help="seconds the other ranks get to stop after one fails; then they get "
                        f"SIGTERM, and SIGKILL {TERM_WAIT_S:g} s later (default {GRACE_S:g})")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S,
                   help="seconds ranks get to stop after a Ctrl-C, SIGTERM or SIGHUP passed on to "
                        f"them; then SIGKILL (default {STOP_TIMEOUT_S:g})")
    p.add_argument("--tag-output", action="store_true",
                   help="start every line a rank writes with [rank N]")
    p.add_argument("-m", dest="module", action="store_true",
                   help="run the target as a module, like python -m")
    p.add_argument("target", help="script path (or module name with -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target")
    return p


def main(argv=None):
    """Run the launcher with ``argv`` (default ``sys.argv[1:]``); return its exit status.

    That is 0, 2 for bad usage, or the failing rank's status (128 + N for a
    rank that died of signal N).
    """
    return _launch(argv)[0]


def _launch(argv):
    """Run as :func:`main` does; return the exit status and the signal the launcher should die of, or None.

    That signal is the first one passed on to the ranks when the rank that
    decides the status died of a signal: the run was interrupted, and a
    shell running the launcher must see it die of, say, SIGINT (a loop in a
    script stops on Ctrl-C only then).  Ranks that handle it and exit decide
    the status themselves, as a program that catches SIGINT does.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad usage (2), already printed: a status, as for our checks
        return (exc.code if isinstance(exc.code, int) else 2), None
    opts.args = _verbatim(argv, opts)
    if not 1 <= opts.nprocs <= _core.MAX_RANKS:
        print(f"python -m blsshm.run: -n must be between 1 and {_core.MAX_RANKS}, got {opts.nprocs}",
              file=sys.stderr)
        return 2, None
    for option, value in (("--grace", opts.grace), ("--stop-timeout", opts.stop_timeout)):
        if not value >= 0:
            print(f"python -m blsshm.run: {option} must be a number of seconds >= 0, got {value}",
                  file=sys.stderr)
            return 2, None
    if not opts.module and not os.path.exists(opts.target):
        print(f"python -m blsshm.run: no such script: {opts.target}", file=sys.stderr)
        return 2, None
    try:
        # Settings the ranks read as they attach (BLSSHM_SPIN_US unless the
        # program passes spin_us): a malformed one is refused once, here.
        default_spin_us()
        liveness_ms()
        ptracer_policy()
        if opts.tag_output:
            make_room_for_descriptors(opts.nprocs, TAGGED_FDS_PER_RANK, START_FDS, "leave out --tag-output")
        name = segment.create(opts.nprocs, opts.lag, opts.arena_bytes, reaped=True)
    except (BlsError, ValueError) as exc:
        print(f"python -m blsshm.run: {exc}", file=sys.stderr)
        return 2, None
    # The interpreter's own flags (-O, -X dev, -W error, ...) too, as
    # `python <flags> script.py` and multiprocessing's spawn keep them.
    interpreter_flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    if sys.flags.ignore_environment and _unbuffered_output(opts) and os.environ.get("PYTHONUNBUFFERED", "1"):
        interpreter_flags.append("-u")  # -E and -I make the ranks ignore PYTHONUNBUFFERED (below)
    cmd = [sys.executable, *interpreter_flags] + (["-m"] if opts.module else []) + [opts.target] + opts.args
    procs = []
    relays = []
    sinks = _Sink(sys.stdout, "stdout"), _Sink(sys.stderr, "stderr")
    observer = None
    old = {}
    signals_seen = []
    forwarded = [s for s in FORWARDED if signal.getsignal(s) != signal.SIG_IGN]

    reached = [0]  # how many ranks, first to last, the passed-on signals reached

    def passed_on():
        # The first signal is the ranks' to handle; a second means "now".
        return signals_seen[0] if len(signals_seen) == 1 else signal.SIGKILL

    def forward(signum, _frame):
        signals_seen.append(signum)
        _signal_groups(procs, passed_on())
        reached[0] = len(procs)

    starting = [False]  # a rank is being started: not yet in procs
    suspend_pending = [False]
    stopped_s = [0.0]  # time spent stopped by Ctrl-Z: no deadline counts it

    def clock():
        return time.monotonic() - stopped_s[0]

    def suspend(_signum, _frame):
        # Ctrl-Z reaches the launcher alone (see _rank_setup): stop the ranks
        # with it, and continue them when the shell continues it (fg, bg).
        if starting[0]:  # the rank being started would be missed: after it is listed
            suspend_pending[0] = True
            return
        _signal_groups(procs, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        stopped_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here, unless our group is orphaned
        stopped_s[0] += time.monotonic() - stopped_at
        signal.signal(signal.SIGTSTP, suspend)
        _signal_groups(procs, signal.SIGCONT)

    try:
        # The launcher keeps a mapping (it is no rank) to tell, after a
        # failure, which rank caused it: the first to abort, or the one lost.
        observer = segment.open_mapping(name)
        old = {s: signal.signal(s, forward) for s in forwarded}
        if signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
            old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
        # Ignored SIGCHLD would reap the ranks behind our back (see _peek_exit).
        old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        stdin = subprocess.DEVNULL if os.isatty(0) else None
        output = subprocess.PIPE if opts.tag_output else None
        try:
            for rank in range(opts.nprocs):
                if signals_seen:  # the run is being stopped: start no more ranks
                    break
                env = dict(os.environ, **{ENV_NAME: name, ENV_RANK: str(rank), ENV_SIZE: str(opts.nprocs),
                                          ENV_LAUNCHER: str(os.getpid())})
                env.update({k: str(rank) for k in TORCHRUN_RANK})
                env.update({k: str(opts.nprocs) for k in TORCHRUN_SIZE})
                if opts.nprocs > 1:  # as torchrun: P ranks of a thread per core each would oversubscribe
                    env.setdefault("OMP_NUM_THREADS", "1")
                if _unbuffered_output(opts):
                    # As torchrun's ``python -u``: what a rank printed is not
                    # lost in its buffer when it is killed (after a failure
                    # elsewhere).  A terminal's lines are written whole anyway,
                    # and unbuffered a print's pieces could interleave there.
                    env.setdefault("PYTHONUNBUFFERED", "1")
                # Held from this thread while a rank starts, so the rank starts
                # with them held too (see _rank_setup).  Another thread (say
                # OpenBLAS's) may still take one, and the handler then runs
                # before the rank is listed: it is passed on here, once.
                signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
                starting[0] = True
                try:
                    procs.append(subprocess.Popen(cmd, env=env, stdin=stdin, stdout=output, stderr=output,
                                                  preexec_fn=_rank_setup(os.getpid(), forwarded)))
                    if signals_seen and reached[0] < len(procs):
                        _signal_groups(procs[reached[0]:], passed_on())
                        reached[0] = len(procs)
                finally:
                    starting[0] = False
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
                if suspend_pending[0]:
                    suspend_pending[0] = False
                    suspend(signal.SIGTSTP, None)
            if len(procs) < opts.nprocs:
                # The ranks started wait for the others to attach; a handler that
                # took the signal and went on would keep them waiting until the
                # stop timeout.  They hear now that the others never come.
                never = "it" if len(procs) == opts.nprocs - 1 else f"ranks {len(procs)}-{opts.nprocs - 1}"
                _core.abort_unattached(observer, len(procs), f"the launcher got "
                                       f"{signal.Signals(signals_seen[0]).name} before it started {never}")
            if opts.tag_output:  # only now: no thread may run while a rank forks (preexec_fn)
                for rank, proc in enumerate(procs):
                    prefix = f"[rank {rank}] ".encode()
                    relays += [_relay(proc.stdout, prefix, sinks[0]), _relay(proc.stderr, prefix, sinks[1])]
            codes, failed_order, cut_short = _supervise(procs, opts.grace, observer, signals_seen,
                                                        opts.stop_timeout, clock)
        finally:
            # Every group, even of a rank that exited: its children may live on.
            _signal_groups(procs, signal.SIGKILL)
            # Unlisted before they are reaped: from then on their pids may name
            # strangers' groups, so a signal arriving while we wait for them or
            # while the relays drain is forwarded to no one.
            ranks = procs[:]
            procs.clear()
            for proc in ranks:
                proc.wait()
            _drain(relays, sinks, signals_seen)
        code = _report(codes, observer, failed_order, cut_short)
        if code is None and signals_seen and len(codes) < opts.nprocs:  # stopped before every rank started
            code = -signals_seen[0]  # not a success, whatever the ranks started did
        status = 0 if code is None else code if code > 0 else 128 - code
        if status == 0 and any(sink.error for sink in sinks):
            status = OUTPUT_LOST_STATUS
        interrupted = signals_seen and signals_seen[0] != signal.SIGQUIT  # no core dump of ours
        return status, signals_seen[0] if interrupted and code is not None and code < 0 else None
    finally:
        if observer is not None:
            observer.close()
        segment.unlink(name)
        for s, handler in old.items():
            signal.signal(s, handler)


def _verbatim(argv, opts):
    """The target's arguments exactly as given: argparse drops a ``--`` right after the target.

    ``python -m blsshm.run -n 2 s.py -- a`` must hand ``s.py`` ``['--', 'a']``,
    as ``python s.py -- a`` would.
    """
    k = len(argv) - len(opts.args)
    if k >= 2 and argv[k - 1] == "--" and argv[k - 2] == opts.target:
        return ["--"] + opts.args
    return opts.args


def _rank_setup(launcher_pid, forwarded):
    """What a rank's process runs before the program: its own process group, and death with the launcher."""
    die = die_with_parent(launcher_pid)

    def setup():
        os.setpgid(0, 0)
        # Out of the terminal's group now.  A signal still pending from
        # before does what it would do to the program (the launcher's copy
        # goes to the others), never runs the launcher's handler here, and
        # the program starts with nothing blocked.
        for s in forwarded:
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        die()
    return setup


def _signal_groups(procs, signum):
    """Send ``signum`` to the process group of every rank (each leads its own)."""
    for proc in procs:
        # The leader is not reaped before the final wait (see _peek_exit),
        # so its pid, the group's id, cannot name anyone else's group.
        try:
            os.killpg(proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _peek_exit(proc):
    """A rank's exit status (as ``Popen.returncode``) or None, leaving it unreaped.

    ``Popen.poll`` would reap it, and its pid, the id of its process group,
    could then be reused for a stranger's group before we kill ours.
    """
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _stopped_by_terminal(proc):
    """SIGTTIN or SIGTTOU if the rank is stopped by it (it used the terminal), else None."""
    # WEXITED too: asked for stops alone, a rank that has just exited is ECHILD.
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    if info is not None and info.si_code == os.CLD_STOPPED and info.si_status in TERMINAL_STOPS:
        return info.si_status
    return None


def _supervise(procs, grace, observer, signals_seen, stop_timeout, clock=time.monotonic):
    """Wait for every rank; after the first failure give the others ``grace`` s.

    Ranks still running then get SIGTERM (their handlers may save work, as
    under torchrun), and TERM_WAIT_S later what is left is killed.
    After the first signal passed on to the ranks (``signals_seen``, which
    the handler fills) they get ``stop_timeout`` s, then SIGKILL: the signal
    was their chance to stop.  Not after SIGQUIT: a core dump takes as long
    as it takes.

    A failure caused by a signal passed on starts no grace period (see
    :func:`_stopping_as_asked`): the others are stopping too, and a grace
    period cut their saving (or core dumps) short long before the stop timeout.

    A rank stopped for using the terminal (outside its foreground group, a
    read stops it, and a write under ``stty tostop``) would wait forever for
    a ``fg`` that cannot come: it is killed, and named.  Returns each rank's
    exit status, the ranks that failed in the order seen, and those the
    launcher itself signalled after the grace period (they failed because
    another did).  Its deadlines are kept by ``clock``, which leaves out the
    time the run was stopped (Ctrl-Z).
    """
    deadline = None
    signalled_at = None
    terminated = False
    gone = set()
    killed = set()
    failed_order = []
    cut_short = set()
    while True:
        for r, p in enumerate(procs):
            stop = _stopped_by_terminal(p) if r not in gone | killed else None
            if stop is not None:
                killed.add(r)  # it dies of SIGKILL now: report its stop once
                print(f"python -m blsshm.run: rank {r} was stopped by {signal.Signals(stop).name}: it "
                      f"{TERMINAL_STOPS[stop]} the terminal, which ranks cannot use (each runs in a "
                      f"process group of its own; its stdin is /dev/null); killing it", file=sys.stderr)
                os.killpg(p.pid, signal.SIGKILL)  # not reaped yet: the group is still its
        codes = [_peek_exit(p) for p in procs]
        for r, c in enumerate(codes):
            if c is not None and r not in gone:
                gone.add(r)
                if c != 0:
                    failed_order.append(r)
                # Does nothing for a rank that attached: its peers watch it.
                if r in cut_short:  # its peers' error should name the cause, not this rank
                    why = (f"the launcher stopped it ({describe_exit(c)}) before it attached, "
                           f"after rank {failed_order[0]} failed")
                else:
                    why = f"it exited ({describe_exit(c)}) without attaching"
                _core.abort_unattached(observer, r, why)
        if deadline is None and any(c not in (None, 0) and not _stopping_as_asked(c, signals_seen)
                                    for c in codes):
            deadline = clock() + grace
        if all(c is not None for c in codes):
            break
        if signals_seen and signalled_at is None and signals_seen[0] != signal.SIGQUIT:
            signalled_at = clock()
        if signalled_at is not None and clock() > signalled_at + stop_timeout:
            running = [r for r, c in enumerate(codes) if c is None]
            print(f"python -m blsshm.run: rank(s) {running} still running {stop_timeout:g} s after "
                  f"{signal.Signals(signals_seen[0]).name} was passed on to them; killing them", file=sys.stderr)
            _signal_groups([procs[r] for r in running], signal.SIGKILL)  # their exit status says so
            signalled_at = float("inf")
        if deadline is not None and clock() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            if terminated:
                print(f"python -m blsshm.run: rank(s) {running} still running {TERM_WAIT_S:g} s after "
                      f"SIGTERM; killing them", file=sys.stderr)
                # Waited for like the others, so the report gives their status.
                _signal_groups([procs[r] for r in running], signal.SIGKILL)
                deadline = float("inf")
                continue
            print(f"python -m blsshm.run: rank(s) {running} still running {grace:g} s after the first "
                  f"failure; sending SIGTERM", file=sys.stderr)
            _signal_groups([procs[r] for r in running], signal.SIGTERM)
            cut_short.update(running)
            terminated = True
            deadline = clock() + TERM_WAIT_S
        time.sleep(0.01)
    codes = [_peek_exit(p) for p in procs]
    failed_order += [r for r, c in enumerate(codes) if c not in (None, 0) and r not in failed_order]
    return codes, failed_order, cut_short


def _stopping_as_asked(code, signals_seen):
    """Whether a rank that failed with ``code`` did so because of the signal passed on: no grace period then.

    After Ctrl-C, SIGTERM or SIGHUP every failure counts (the handler's own
    exit, the abort its peers raise): the others are stopping too, and the
    stop timeout bounds them; a grace period cut their saving short.  Ctrl-\\
    sets no stop timeout (a core dump takes as long as it takes), so there
    only a death by it counts, and a rank's own failure still starts one.
    """
    if not signals_seen:
        return False
    if signals_seen[0] == signal.SIGQUIT:
        return code == -signal.SIGQUIT
    return True


def _report(codes, observer, failed_order, cut_short):
    """Print what failed; return None, or the exit status (as ``Popen.returncode``) of the rank that caused it.

    That is the rank that aborted the communicator first or that the others
    found lost, else the first to fail that the launcher did not stop itself
    (``cut_short``).  ``failed_order`` lists the failed ranks as they were seen.
    """
    failed = [r for r in failed_order if codes[r] not in (None, 0)]
    if not failed:
        return None
    culprit = next((r for r in failed if r not in cut_short), failed[0])
    abort = _core.read_abort(observer)
    if abort is not None:
        rank, kind, lost_rank, _ = abort
        suspect = lost_rank if kind == "peer_lost" else rank
        print(f"python -m blsshm.run: {_core.describe_abort(abort)}", file=sys.stderr)
        # Not a rank the launcher stopped before it attached, for which it
        # wrote this abort itself, after another rank failed.
        launchers_own = kind == "peer_lost" and suspect in cut_short
        if suspect in failed and not launchers_own:
            culprit = suspect
    for r in failed:
        after = ", from the launcher after the grace period" if r in cut_short and codes[r] < 0 else ""
        print(f"python -m blsshm.run: rank {r} failed ({describe_exit(codes[r])}{after})", file=sys.stderr)
    return codes[culprit]


class _Sink:
    """One of the launcher's own streams, written whole lines at a time by several relays.

    Once it cannot be written the relays go on draining the ranks' pipes (a
    rank must never block on a full one) and drop what they read.  A closed
    reader (``| head``) or a stream closed from the start does that quietly;
    any other error (a full disk) is said once, and ``error`` makes the
    run's status :data:`OUTPUT_LOST_STATUS` if it would be 0.
    """

    def __init__(self, stream, name):
        self.stream, self.name = stream, name
        self.lock = threading.Lock()
        self.broken = stream is None  # the launcher started with that descriptor closed
        self.error = None

    def write(self, data):
        with self.lock:
            if self.broken:
                return
            try:
                self._flush_own()  # what the launcher printed itself goes first
                raw = getattr(self.stream, "buffer", None)
                if raw is None:  # a text-only stream (main() called with sys.stdout replaced: a notebook)
                    self.stream.write(data.decode(errors="replace"))
                    self.stream.flush()
                else:
                    try:
                        fd = raw.fileno()
                    except (OSError, ValueError):  # a buffer in memory
                        raw.write(data)
                        raw.flush()
                    else:
                        _write_all(fd, data)
            except (BrokenPipeError, ValueError):  # a reader gone, a stream closed: drop quietly
                self.broken = True
            except OSError as exc:
                self.broken, self.error = True, exc
                if self.name != "stderr" and sys.stderr is not None:
                    try:
                        print(f"python -m blsshm.run: cannot write the ranks' output to {self.name} ({exc}); "
                              f"dropping the rest of it", file=sys.stderr, flush=True)
                    except (OSError, ValueError):
                        pass

    def _flush_own(self):
        while True:
            try:
                self.stream.flush()
                return
            except BlockingIOError:  # a non-blocking descriptor (left so by our parent): wait for room
                _wait_writable(self.stream.fileno())


def _write_all(fd, data):
    """All of ``data`` to ``fd``, waiting for room if the descriptor is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            _wait_writable(fd)


def _wait_writable(fd):
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()


class _Relay(threading.Thread):
    """Copies a rank's output pipe to a :class:`_Sink` line by line, each line prefixed."""

    def __init__(self, pipe, prefix, sink):
        super().__init__(name=f"relay {prefix.decode().strip()}", daemon=True)
        self.pipe, self.prefix, self.sink = pipe, prefix, sink
        self.read_bytes = 0    # taken from the pipe so far
        self.passed_bytes = 0  # of those, passed on to the sink (a partial line counts once read)

    def run(self):
        pending = []  # pieces of a line whose newline has not come yet
        pending_bytes = 0
        midline = False  # what was passed on last is the start of a line longer than RELAY_LINE_MAX
        fd = self.pipe.fileno()
        while True:
            chunk = os.read(fd, RELAY_CHUNK)
            if not chunk:
                break
            self.read_bytes += len(chunk)
            out = []
            if b"\n" in chunk:  # only the new bytes are searched: a long line costs no more than its length
                lines = chunk.split(b"\n")
                lines[0] = b"".join(pending + [lines[0]])
                pending = [lines.pop()]
                pending_bytes = len(pending[0])
                for line in lines:
                    out.append((b"" if midline else self.prefix) + line + b"\n")
                    midline = False
            else:
                pending.append(chunk)
                pending_bytes += len(chunk)
            if pending_bytes > RELAY_LINE_MAX:  # passed on in pieces, the bytes as written, prefixed once
                out.append((b"" if midline else self.prefix) + b"".join(pending))
                pending, pending_bytes, midline = [], 0, True
            if out:
                self.sink.write(b"".join(out))
            self.passed_bytes += len(chunk)
        if pending_bytes or midline:
            self.sink.write((b"" if midline else self.prefix) + b"".join(pending) + b"\n")
        self.pipe.close()

    def unread_bytes(self):
        """Bytes waiting in the pipe now (0 once it is closed)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.pipe.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return 0


def _relay(pipe, prefix, sink):
    """A started :class:`_Relay` of ``pipe``."""
    relay = _Relay(pipe, prefix, sink)
    relay.start()
    return relay


def _drain(relays, sinks, signals_seen):
    """Wait for the relays to pass on the ranks' last lines, then stop them writing.

    The ranks' groups are dead by now, so the pipes end, unless a process that
    left its rank's group (``setsid``) still holds one.  What the ranks wrote
    (what each pipe held when this began) is passed on at our reader's pace
    (``| less``, a terminal paused with Ctrl-S); anything after it gets
    RELAY_DRAIN_S in all, and is dropped after that (a thread writing to our
    stdout while the interpreter shuts down could crash it).  A signal
    arriving meanwhile (Ctrl-C) ends the wait at once.
    """
    signals_before = len(signals_seen)
    deadline = time.monotonic() + RELAY_DRAIN_S
    owed = [relay.read_bytes + relay.unread_bytes() for relay in relays]
    for relay, target in zip(relays, owed):
        while (relay.is_alive() and len(signals_seen) == signals_before
               and (relay.passed_bytes < target or time.monotonic() < deadline)):
            relay.join(0.05)
    for sink in sinks:
        with sink.lock:
            sink.broken = True


if __name__ == "__main__":
    exit_status, stop_signal = _launch(None)
    if stop_signal is not None:
        die_of(stop_signal)
    sys.exit(exit_status)
