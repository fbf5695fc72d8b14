"""Ctrl-C, SIGTERM or SIGHUP to python -m dlrm_bench: cleaned up in every backend, and said in one line."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from dlrm_bench.config import mpi_available

LONG_RUN = ["--arch-embedding-size", "100-100-100-100", "--arch-sparse-feature-size", "8",
            "--arch-mlp-bot", "4-8", "--arch-mlp-top", "4-1", "--mini-batch-size", "16",
            "--num-batches", "1000000", "--warmup-batches", "0", "--nprocs", "2", "--no-progress"]


def _marked():
    """Pids of live processes whose environment holds our marker (children inherit it)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if MARK in f.read():
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            pids.add(int(entry))
        except OSError:
            pass
    return pids


MARK = f"DLRM_SIGNAL_TEST={uuid.uuid4().hex}".encode()


def _all_gone(seconds=30.0):
    """Whether every process of the run has exited (ranks die with their parents; reapers may lag)."""
    deadline = time.monotonic() + seconds
    while _marked():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill_all(proc):
    """Whatever the test's outcome: nothing of the run stays."""
    for pid in _marked():
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend, signum, to_group", [
    ("bls", signal.SIGINT, True),  # a terminal's Ctrl-C reaches the ranks too
    ("bls", signal.SIGTERM, False), ("gloo", signal.SIGHUP, False), ("mpi", signal.SIGTERM, False)])
def test_a_terminated_run_leaves_nothing_behind(tmp_path, backend, signum, to_group):
    if backend == "mpi" and mpi_available() is not None:
        pytest.skip(mpi_available())
    key, value = MARK.decode().split("=")
    env = dict(os.environ, TMPDIR=str(tmp_path), **{key: value})
    proc = subprocess.Popen([sys.executable, "-m", "dlrm_bench", *LONG_RUN, "--backend", backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith(b"dlrm_bench: ")  # the run has begun
        time.sleep(2.0)  # ranks are starting (importing torch) or running; either must be cleaned up
        assert proc.poll() is None, proc.stderr.read()
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signum  # dies of it, after cleaning up, so a calling loop stops too
        assert err.decode().splitlines() == [f"dlrm_bench: interrupted by {signal.Signals(signum).name}"]
        assert _all_gone(), "processes of the run outlived it"
        assert os.listdir(tmp_path) == []  # temporary files of the backend removed
    finally:
        _kill_all(proc)


@pytest.mark.timeout(120)
def test_a_killed_mpi_run_lets_mpirun_clean_up(tmp_path):
    """SIGKILL, which dlrm_bench cannot act on: mpirun is told (SIGTERM), stops
    its ranks and removes its session files and shared-memory segments."""
    if mpi_available() is not None:
        pytest.skip(mpi_available())
    key, value = MARK.decode().split("=")
    env = dict(os.environ, TMPDIR=str(tmp_path), **{key: value})
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "dlrm_bench", *LONG_RUN, "--backend", "mpi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith(b"dlrm_bench: ")
        for _ in range(300):  # until the ranks have made their segments
            if set(os.listdir("/dev/shm")) - shm_before:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        proc.kill()
        proc.wait()
        assert _all_gone(), "processes of the run outlived it"
        assert set(os.listdir("/dev/shm")) - shm_before == set()
        # Only dlrm_bench's own directory stays: a killed process cannot remove it.
        assert [p.name.startswith("dlrm-bench-mpi-") for p in tmp_path.iterdir()] == [True]
    finally:
        _kill_all(proc)


@pytest.mark.timeout(60)
def test_a_termination_reaches_ranks_that_ignore_ctrl_c():
    # In a background job of a non-interactive shell (`cmd &` in a script)
    # SIGINT starts out ignored, in the ranks too: a SIGTERM passed on to
    # them as a Ctrl-C left them computing for the whole grace period (10 s,
    # as long as docker stop waits).
    code = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
import dlrm_bench.__main__ as main
rank = subprocess.Popen([sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)"],
                        stdout=subprocess.PIPE)
try:
    rank.stdout.readline()  # it runs, with SIGINT ignored as inherited
    main._interrupt_children()
    print(rank.wait(timeout=20))
finally:
    rank.kill()
    rank.wait()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(-signal.SIGTERM)]
