"""Small process helpers shared by the launcher, spawn, and the tools that start mpirun."""
import contextlib
import ctypes
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

from blsshm.errors import BlsValueError

_PR_SET_PDEATHSIG = 1
_PR_SET_PTRACER = 0x59616D61  # "Yama"
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1)
YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"

#: Seconds the other ranks get to notice a failure and stop by themselves.
GRACE_S = 10.0
#: Seconds ranks still running after the grace period get between SIGTERM
#: (a handler may save work, as under torchrun) and SIGKILL.
TERM_WAIT_S = 2.0
#: Seconds the launcher's ranks get to stop after a Ctrl-C or SIGTERM passed
#: on to them, before SIGKILL (torchrun gives its workers as long).
STOP_TIMEOUT_S = 30.0


def pid_namespace():
    """The inode of this process's PID namespace: two processes' pids are
    comparable only when theirs match.  0 if it cannot be read (no /proc)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_peer_reads_lock = threading.Lock()
_peer_reads_allowed_in = None  # the pid that allow_peer_reads last ran in


def _libc_prctl(*args):
    return ctypes.CDLL(None, use_errno=True).prctl(*args)


def allow_peer_reads():
    """Let the ranks read this process's memory with ``process_vm_readv`` under Yama's scope 1.

    Direct reads (``Comm.direct_min_bytes``) need the access ptrace needs.
    Yama's ``ptrace_scope`` 1, the default of Ubuntu and others, grants it
    only to a process's ancestors, so sibling ranks refuse each other and
    large blocks go through the records: two copies instead of one.  As
    Open MPI's shared-memory transport does for its CMA, this declares
    every process a permitted tracer (``PR_SET_PTRACER_ANY``): any process
    of the same user may then ptrace this one (attach, read and write its
    memory), as with scope 0, until it exits; it replaces a
    ``PR_SET_PTRACER`` the program set.  Scopes 2 and 3 admit no such
    exception, and 0 (or no Yama) needs none: nothing is changed then.
    Core calls it before a blocking alltoallv first offers a block, unless
    ``BLSSHM_PTRACER=keep``.  Once per process; True if this call declared it.
    """
    global _peer_reads_allowed_in
    with _peer_reads_lock:  # a second thread's call returns once the first has declared
        if _peer_reads_allowed_in == os.getpid():  # done here (a forked child must declare its own)
            return False
        try:
            with open(YAMA_PTRACE_SCOPE) as f:
                scope = f.read().strip()
        except OSError:  # no Yama
            scope = ""
        declared = False
        if scope == "1":
            zero = ctypes.c_ulong(0)  # prctl is variadic: every argument a full unsigned long
            try:
                # Failure only costs speed: peers then refuse our offers once and use the records.
                declared = _libc_prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, zero, zero, zero) == 0
            except (OSError, AttributeError):  # pragma: no cover - no libc prctl
                pass
        _peer_reads_allowed_in = os.getpid()
        return declared


def die_with_parent(parent_pid, signum=signal.SIGKILL):
    """A function that asks the kernel to send ``signum`` (SIGKILL) to the
    calling process when its parent dies (Linux), and exits at once if
    ``parent_pid`` died already.  A process that cleans up after others
    (mpirun) should get SIGTERM, which it can act on.

    ``parent_pid`` is the process that started us.  With multiprocessing's
    forkserver our parent is the fork server instead, which outlives that
    process (its children, us included, hold its liveness pipe open): then a
    thread watches ``parent_pid`` itself (see :func:`_watch_starter`), and
    the fork server's death means nothing to us.  (Armed against it, a
    SIGTERM to the whole process group, as GNU ``timeout`` sends, killed us
    with the server, before the stop the SIGTERM asked of us.)
    """
    def arm():
        parent = os.getppid()
        if parent != parent_pid:  # a fork server's child
            _watch_starter(parent_pid)
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            return
        if os.getppid() != parent:  # our parent died before prctl took effect
            os._exit(1)
    return arm


def _watch_starter(pid):
    """SIGKILL this process when ``pid`` exits, from a daemon thread: what
    PR_SET_PDEATHSIG does for a parent, for a process that is not ours."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # gone already
    except (OSError, AttributeError):  # pragma: no cover - no pidfds: poll
        fd = -1

    def watch():
        if fd >= 0:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll()  # readable once the process has exited
        else:  # pragma: no cover
            while _alive(pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="blsshm-starter-watch", daemon=True).start()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process took the pid
        return True
    return True


def descendants(pid, fds=None, pidfd=-1):
    """Pidfds of the processes ``pid`` started, and of theirs, as they are now; the caller closes them.

    For stopping a process with what it started when it leads no process
    group of its own.  A pidfd names its process for good, however late the
    signal; processes that left the tree (orphaned by a double fork) are not
    found.  Empty without /proc or pidfds.  Appended to ``fds`` if given, as
    they are opened (an interruption then loses none).  ``pidfd``, a pidfd
    of ``pid``, tells whether that pid was still its when its children were
    read; without one (-1) the caller must keep ``pid`` from being reaped.
    """
    fds = [] if fds is None else fds
    todo = [(pid, pidfd)]  # (pid, its pidfd or -1)
    while todo:
        parent, parent_fd = todo.pop()
        for child in children_of(parent):
            try:
                fd = os.pidfd_open(child)
            except (OSError, AttributeError):
                continue  # gone already, or no pidfds
            # Its parent is ``parent``, and, asked afterwards, the process we
            # hold as ``parent`` still runs: so that pid was still its, not a
            # stranger's that took it over (and whose children these would be).
            if _parent_of(child) != parent or (parent_fd >= 0 and pidfd_exited(parent_fd)):
                os.close(fd)
                continue
            fds.append(fd)
            todo.append((child, fd))
    return fds


def pidfd_exited(fd):
    """Whether the process of pidfd ``fd`` has exited (the pidfd is readable then)."""
    poller = select.poll()  # not select(): descriptors may be above FD_SETSIZE
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def children_of(pid):
    """The pids of ``pid``'s children now, from /proc (every thread's; empty if it is gone)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return children


def _parent_of(pid):
    """The parent pid of ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def signal_pidfds(fds, signum):
    """Send ``signum`` to the process of each pidfd that still runs."""
    for fd in fds:
        try:
            signal.pidfd_send_signal(fd, signum)
        except OSError:  # gone (ESRCH)
            pass


def make_room_for_descriptors(nprocs, per_rank, spare, remedy="start fewer ranks"):
    """Raise the soft limit on open files toward the hard one if ``nprocs`` ranks need more; else a clear error.

    The ranks hold ``per_rank`` descriptors each in this process while they
    run, and starting one takes up to ``spare`` more.  Past the limit a
    start failed halfway with a bare ``OSError: Too many open files`` (at
    about 250 ranks of ``spawn`` under the usual 1024).
    """
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        return  # cannot tell: let the starts say it
    needed = in_use + per_rank * nprocs + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return
    raise BlsValueError(f"{nprocs} ranks need about {needed} open files in this process, more than its "
                        f"limit of {soft} (hard limit {hard}): raise it (ulimit -n) or {remedy}")


def describe_exit(code):
    """'exit code 3' or 'signal SIGKILL' for a process's return code."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def stop_process(proc, grace):
    """Stop a ``subprocess.Popen``: SIGTERM (mpirun passes it on to its ranks),
    SIGKILL after ``grace`` seconds; always reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def mpirun_options(mpirun, oversubscribe=True):
    """``mpirun``'s options for a job on this node: ranks not bound to cores and, for Open MPI's,
    shared memory between them, more ranks than cores allowed (``oversubscribe``), root allowed.

    Open MPI's shared-memory BTL is ``sm`` from version 5 on and ``vader``
    before, when ``sm`` names a removed component and the job fails.
    MPICH's mpirun takes none of Open MPI's options.
    """
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        said = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        said = ""
    if "Open MPI" not in said and "OpenRTE" not in said:
        return ["-bind-to", "none"]  # MPICH's (Hydra's) spelling
    found = re.search(r"(?:Open MPI|OpenRTE)\)? (\d+)\.", said)
    btl = "self,sm" if found is None or int(found.group(1)) >= 5 else "self,vader"
    return (["--mca", "btl", btl, "--bind-to", "none"] + (["--oversubscribe"] if oversubscribe else [])
            + (["--allow-run-as-root"] if os.geteuid() == 0 else []))


def find_mpirun():
    """Path of ``mpirun``, looking first beside this Python (a pip-installed Open MPI lives there)."""
    here = os.path.dirname(sys.executable)
    return shutil.which("mpirun", path=here + os.pathsep + os.environ.get("PATH", ""))


def die_of(signum):
    """End this process by ``signum``'s default action, so a calling shell or loop knows what stopped it.

    Standard streams are flushed first: a signal's default action would
    lose what they buffer.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
        except (OSError, ValueError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)  # to this thread, unblocked: delivered before kill returns
    sys.exit(128 + signum)  # reached only where the kernel drops it: as PID 1 of a namespace
