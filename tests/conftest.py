"""Every test leaves nothing behind: no /dev/shm segment of ours or our peers', no child process."""
import os
import time

import pytest


# Ours, and what the peers we run make: Open MPI's shared-memory transport
# (v5 sm_segment.*, v4 vader_segment.*) and torch's shared tensors.
SEGMENT_PREFIXES = ("blsshm-", "sm_segment.", "vader_segment.", "torch_")


def _our_segments():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SEGMENT_PREFIXES)}
    except FileNotFoundError:  # pragma: no cover
        return set()


def _is_multiprocessing_helper(pid):
    """multiprocessing's own long-lived helpers (resource tracker, fork server)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False
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


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before_segments = _our_segments()
    before_children = _children()
    yield
    # Give a failing test's cleanup a moment, then insist.
    deadline = time.monotonic() + 2.0
    while True:
        segments = _our_segments() - before_segments
        children = _children() - before_children
        if not segments and not children or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in children:  # reap them so one failure does not cascade
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    for name in segments:  # the test fails, but leaves nothing in /dev/shm either
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass
    assert not segments, f"test left shared-memory segments behind: {sorted(segments)}"
    assert not children, f"test left child processes behind: {sorted(children)}"


@pytest.fixture
def no_dlrm_runs(monkeypatch):
    """Fail the test if dlrm_bench's CLI gets as far as starting ranks."""
    from dlrm_bench import backends

    def refuse(*_args, **_kwargs):
        pytest.fail("backends.run was called for a command line that should be refused")
    monkeypatch.setattr(backends, "run", refuse)
