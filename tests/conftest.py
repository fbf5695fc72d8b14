"""Every test leaves nothing behind: no /dev/shm segment of ours or our peers', no child process."""
import os
import signal
import time
import uuid

import pytest

# Run as a background job of a non-interactive shell (`python -m pytest &` in
# a script, some CI runners), pytest starts with SIGINT and SIGQUIT ignored,
# and every process it starts inherits that: the tests of Ctrl-C and of
# signals passed on then failed (17 of them).  A handler, unlike SIG_IGN, is
# reset to the default in an exec'd child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

# In the environment of every process the tests start (children inherit it,
# mpirun passes it on to its ranks): what tells our processes from those of
# other jobs on the machine, whose segments are not ours to judge or remove.
RUN_MARK = "BLSSHM_TEST_RUN"
os.environ[RUN_MARK] = uuid.uuid4().hex


# Ours, and what the peers we run make: Open MPI's shared-memory transport
# (v5 sm_segment.*, v4 vader_segment.*) and torch's shared tensors.
SEGMENT_PREFIXES = ("blsshm-", "sm_segment.", "vader_segment.", "torch_")


def _our_segments():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SEGMENT_PREFIXES)}
    except FileNotFoundError:  # pragma: no cover
        return set()


def _held_by_others(names):
    """Those of ``names`` (in /dev/shm) that a process of another job maps,
    holds open or names on its command line, and no process of this run does.

    Ours are this process, its descendants, and whatever has our mark in
    the environment it was started with (an exec'd orphan).  A segment that
    nobody holds is ours to judge: it was left behind.
    """
    paths = {"/dev/shm/" + n: n for n in names}
    parent, holders = {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            held = {n for n in names if n.encode() in cmdline} | {paths[p] for p in paths if p in maps}
            fds = os.listdir(f"/proc/{pid}/fd")
        except (OSError, ValueError, IndexError):  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                held.add(paths[os.readlink(f"/proc/{pid}/fd/{fd}")])
            except (OSError, KeyError):
                pass
        if held:
            holders[pid] = held

    def is_ours(pid):
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == os.getpid():
                return True
            seen.add(pid)
            pid = parent.get(pid, 0)
        return False

    ours, theirs = set(), set()
    for pid, held in holders.items():
        (ours if _has_our_mark(pid) or is_ours(pid) else theirs).update(held)
    return theirs - ours


def _has_our_mark(pid):
    """Whether ``pid`` was exec'd with this run's mark in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:  # a zombie's cannot be read: it is gone
            return f"{RUN_MARK}={os.environ[RUN_MARK]}".encode() in f.read().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def _is_multiprocessing_helper(pid):
    """multiprocessing's own long-lived helpers (resource tracker, fork server)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting as we read (ESRCH)
        return False  # still counted: the caller looks again until it is gone
    return b"resource_tracker" in cmdline or b"forkserver" in cmdline


def _children():
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return {p for p in pids if not _is_multiprocessing_helper(p)}


def _marked():
    """Processes started by this run's programs, wherever they were re-parented
    (our mark in the environment they were exec'd with; forked children, which
    _children() finds, show the environment pytest was started with)."""
    pids = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _has_our_mark(pid)}
    return {p for p in pids if p != os.getpid() and not _is_multiprocessing_helper(p)}


def _strays():
    """Our children, and every process a program we ran started (a launcher's ranks)."""
    return _children() | _marked()


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before_segments = _our_segments()
    before_children = _strays()
    yield
    # Give a failing test's cleanup a moment, then insist.
    deadline = time.monotonic() + 2.0
    others = set()
    while True:
        segments = _our_segments() - before_segments - others
        if segments:
            others |= _held_by_others(segments)
            segments -= others
        children = _strays() - before_children
        if not segments and not children or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in children:  # kill (and reap, if ours) them so one failure does not cascade
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):  # gone, or another's child (its parent reaps it)
            pass
    for name in segments:  # the test fails, but leaves nothing in /dev/shm either
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass
    assert not segments, f"test left shared-memory segments behind: {sorted(segments)}"
    assert not children, f"test left processes behind: {sorted(children)}"


@pytest.fixture
def no_dlrm_runs(monkeypatch):
    """Fail the test if dlrm_bench's CLI gets as far as starting ranks."""
    from dlrm_bench import backends

    def refuse(*_args, **_kwargs):
        pytest.fail("backends.run was called for a command line that should be refused")
    monkeypatch.setattr(backends, "run", refuse)
