"""Small process helpers shared by the launcher, spawn, and the tools that start mpirun."""
import ctypes
import os
import shutil
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def pid_namespace():
    """The inode of this process's PID namespace: two processes' pids are
    comparable only when theirs match.  0 if it cannot be read (no /proc)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def die_with_parent(parent_pid):
    """A function that asks the kernel to SIGKILL the calling process when its
    parent dies (Linux), and exits at once if ``parent_pid`` died already.

    ``parent_pid`` is the process that started us.  With multiprocessing's
    forkserver our parent is the fork server instead, which exits when that
    process does: its death is the signal then.
    """
    def arm():
        parent = os.getppid()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            return
        if os.getppid() != parent:  # our parent died before prctl took effect
            os._exit(1)
        if parent != parent_pid and not _alive(parent_pid):  # a fork server's child, its starter gone
            os._exit(1)
    return arm


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process took the pid
        return True
    return True


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


def find_mpirun():
    """Path of ``mpirun``, looking first beside this Python (a pip-installed Open MPI lives there)."""
    here = os.path.dirname(sys.executable)
    return shutil.which("mpirun", path=here + os.pathsep + os.environ.get("PATH", ""))
