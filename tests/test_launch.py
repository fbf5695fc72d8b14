"""python -m blsshm.run and blsshm.spawn: start, report, always clean up."""
import contextlib
import errno
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import blsshm
from blsshm.errors import BlsError
from blsshm.run import RELAY_DRAIN_S
from harness import process_state, running

pytestmark = pytest.mark.timeout(60)

SCRIPT = r"""
import sys
import numpy as np
import blsshm

with blsshm.init() as comm:
    iters = int(sys.argv[1])
    for t in range(iters):
        send = np.full(comm.size, comm.rank * 1000 + t, dtype=np.int64)
        comm.post(t, send, [1] * comm.size)
        if t >= comm.lag:
            recv, _ = comm.complete(t - comm.lag)
            assert recv.tolist() == [s * 1000 + t - comm.lag for s in range(comm.size)]
    for t in range(max(0, iters - comm.lag), iters):
        comm.complete(t)
    line = f"rank {comm.rank} of {comm.size} lag {comm.lag} done {comm.next_complete}\n"
    import os; os.write(1, line.encode())  # one write per rank: lines never interleave
"""


def _launch(tmp_path, *args, script=SCRIPT, timeout=50):
    path = tmp_path / "prog.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "blsshm.run", *args, str(path), "300"],
                          capture_output=True, text=True, timeout=timeout)


def test_launcher_runs_every_rank(tmp_path):
    res = _launch(tmp_path, "-n", "3", "--lag", "2", "--arena-bytes", "65536")
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.split("\n")[:-1])
    assert lines == [f"rank {r} of 3 lag 2 done 300" for r in range(3)]


def test_launcher_reports_the_failing_rank_and_stops_the_others(tmp_path):
    failing = SCRIPT.replace("    line = f", "    sys.exit(7) if comm.rank == 1 else None\n    import time; time.sleep(1) if comm.rank != 1 else None\n    line = f")
    failing = failing.replace("for t in range(iters):", "for t in range(iters if comm.rank != 1 else 5):")
    res = _launch(tmp_path, "-n", "3", "--tag-output", script=failing)  # whole lines from each rank
    assert res.returncode == 7
    assert "rank 1 failed (exit code 7)" in res.stderr
    for r in (0, 2):  # told, not left hanging
        assert f"[rank {r}] blsshm.errors.CommAborted: communicator aborted by rank 1" in res.stderr, res.stderr


def test_launcher_blames_the_rank_that_failed_not_one_it_stopped_before_it_attached(tmp_path):
    # Rank 1 still starts up (before init) when rank 0 fails: the launcher
    # stops it after the grace period and aborts the communicator for it.
    # That abort named rank 1 as lost, and the run's status was its SIGTERM.
    script = (
        "import os, time, blsshm\n"
        "if os.environ['RANK'] == '0':\n"
        "    comm = blsshm.init(); raise SystemExit('rank 0: bad config')\n"
        "time.sleep(60); blsshm.init()\n")
    res = _launch(tmp_path, "-n", "2", "--grace", "0.5", script=script)
    assert res.returncode == 1, res.stderr
    assert "rank 1 was lost: the launcher stopped it (signal SIGTERM) before it attached, " \
           "after rank 0 failed" in res.stderr
    assert "rank 0 failed (exit code 1)" in res.stderr


def test_launcher_blames_a_rank_that_aborted_even_when_it_had_to_stop_it(tmp_path):
    # Only its own abort for a rank stopped before attaching is not blame.
    script = (
        "import time, numpy, blsshm\n"
        "comm = blsshm.init()\n"
        "if comm.rank == 1:\n"
        "    comm.abort('bad input'); time.sleep(60)\n"
        "comm.alltoallv(numpy.zeros(2), [1, 1])\n")
    res = _launch(tmp_path, "-n", "2", "--grace", "0.5", script=script)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "communicator aborted by rank 1" in res.stderr


def test_launcher_reports_a_rank_it_had_to_kill_after_sigterm(tmp_path):
    # Rank 0 ignores SIGTERM: killed TERM_WAIT_S later, it went unreported.
    script = (
        "import os, signal, time, numpy, blsshm\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "comm = blsshm.init()\n"
        "comm.alltoallv(numpy.zeros(2), [1, 1])  # rank 0 ignores SIGTERM before rank 1 fails\n"
        "if comm.rank == 1:\n"
        "    raise SystemExit(5)\n"
        "time.sleep(60)\n")
    res = _launch(tmp_path, "-n", "2", "--grace", "0.2", script=script)
    assert res.returncode == 5, res.stderr
    assert "rank(s) [0] still running 2 s after SIGTERM; killing them" in res.stderr
    assert "rank 0 failed (signal SIGKILL, from the launcher after the grace period)" in res.stderr
    assert "rank 1 failed (exit code 5)" in res.stderr


def test_launcher_rejects_bad_arguments(tmp_path):
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "0", "x.py"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "-n must be between 1 and 4096, got 0" in res.stderr
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "5000", "x.py"],  # said "size"
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "-n must be between 1 and 4096, got 5000" in res.stderr
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--grace", "-1", "x.py"],
                         capture_output=True, text=True, timeout=30)  # was taken, silently
    assert res.returncode == 2 and "--grace must be a number of seconds >= 0" in res.stderr
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--stop-timeout", "nan", "x.py"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--stop-timeout must be a number of seconds >= 0, got nan" in res.stderr
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(tmp_path / "missing.py")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "no such script" in res.stderr
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--lag", "-1", "x.py"],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert res.returncode == 2


@pytest.mark.parametrize("variable, words", [("BLSSHM_SPIN_US", "must be a number"),
                                             ("BLSSHM_LIVENESS_MS", "must be a number"),
                                             ("BLSSHM_PTRACER", "must be 'any'")])
def test_the_launcher_refuses_a_bad_setting_before_starting_ranks(variable, words, tmp_path):
    # Each rank started, raised it with a traceback, and the run failed with exit status 1.
    script = tmp_path / "s.py"
    script.write_text("print('rank ran')\n")
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(script)], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, **{variable: "soon"}))
    assert res.returncode == 2
    assert res.stderr.startswith(f"python -m blsshm.run: {variable} {words}") and "soon" in res.stderr
    assert "rank ran" not in res.stdout


def test_main_returns_the_status_of_usage_errors_too(capsys):
    # argparse's own errors raised SystemExit out of main(), which says it returns a status.
    from blsshm import run
    assert run.main(["-n", "2", "--no-such-flag", "x.py"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert run.main(["--help"]) == 0
    assert "--stop-timeout" in capsys.readouterr().out


ECHO_ARGS = r"""
import os, sys
import blsshm
with blsshm.init() as comm:
    if comm.rank == 0:
        os.write(1, repr(sys.argv[1:]).encode())
"""


@pytest.mark.parametrize("args", [["--", "a", "--", "b"], ["a", "--", "b"], ["--lag", "3", "-n", "2", "--"]])
def test_the_program_gets_its_arguments_verbatim(tmp_path, args):
    # argparse dropped a "--" right after the program: it got ["a", "--", "b"].
    path = tmp_path / "prog.py"
    path.write_text(ECHO_ARGS)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(path), *args],
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout == repr(args)


FLAGS = r"""
import os, sys
import blsshm
with blsshm.init() as comm:
    os.write(1, f"optimize={sys.flags.optimize} dev_mode={sys.flags.dev_mode} "
                f"unbuffered={sys.stdout.write_through}\n".encode())
"""


@pytest.mark.parametrize("flags", [["-O", "-X", "dev"], ["-E", "-O", "-X", "dev"]], ids=["-O -X dev", "-E too"])
def test_ranks_run_with_the_interpreter_flags_of_the_launcher(tmp_path, flags):
    # They ran without them, unlike `python -O script.py` and multiprocessing's
    # spawn; and given -E, they ignored the PYTHONUNBUFFERED that keeps what a
    # rank printed when it is killed: they need -u then.
    path = tmp_path / "prog.py"
    path.write_text(FLAGS)
    res = subprocess.run([sys.executable, *flags, "-m", "blsshm.run", "-n", "2", str(path)],
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["optimize=1 dev_mode=True unbuffered=True"] * 2
    assert "ResourceWarning" not in res.stderr


SPAWN_IN_DEV_MODE = r"""
import numpy as np
import blsshm

def step(comm):
    return comm.alltoallv(np.zeros(comm.size), [1] * comm.size)[1].tolist()

if __name__ == "__main__":
    print(blsshm.spawn(step, 2))
"""


def test_forked_ranks_do_not_warn_about_the_parents_reaper(tmp_path):
    # Each forked rank dropped its copy of the reaper's Popen, which warned
    # "ResourceWarning: subprocess ... is still running" under -X dev: the
    # reaper is the parent's child, and it was running.
    path = tmp_path / "prog.py"
    path.write_text(SPAWN_IN_DEV_MODE)
    res = subprocess.run([sys.executable, "-X", "dev", str(path)], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "[[1, 1], [1, 1]]\n" and "ResourceWarning" not in res.stderr, res.stderr


INIT_TWICE = r"""
import blsshm
with blsshm.init() as comm:
    try:
        blsshm.init()
    except blsshm.BlsError as exc:
        print(f"rank {comm.rank}: {exc}", flush=True)
    comm.alltoallv(__import__("numpy").zeros(comm.size), [1] * comm.size)  # still works
"""


INIT_IN_A_RANKS_CHILD = r"""
import os, subprocess, sys
import numpy as np
import blsshm
with blsshm.init() as comm:
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)  # every rank attached: the segment is gone
    if comm.rank == 0:
        pid = os.fork()
        if pid == 0:
            try:
                blsshm.init()
                os.write(1, b"fork: init returned\n")
            except blsshm.BlsError as exc:
                os.write(1, f"fork: {exc}\n".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = subprocess.run([sys.executable, "-c", "import blsshm; blsshm.init()"],
                               capture_output=True, text=True, timeout=30)
        os.write(1, f"exec: {child.stderr.strip().splitlines()[-1]}\n".encode())
        os.write(1, f"parent {os.getpid()} {os.getppid()}\n".encode())
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)  # still works
"""


def test_init_in_a_ranks_child_says_it_is_not_a_rank(tmp_path):
    # Both said the segment did not exist: every rank must attach before any starts communicating.
    res = _launch(tmp_path, "-n", "2", script=INIT_IN_A_RANKS_CHILD)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) if ": " in line else line.split(" ", 1) for line in res.stdout.splitlines())
    rank0, launcher = lines["parent"].split()
    not_a_rank = blsshm._NOT_A_RANK
    assert not_a_rank.startswith("only the processes `python -m blsshm.run` started are ranks")
    assert lines["fork"] == f"blsshm.init() in a child forked from rank 0 (pid {rank0}): {not_a_rank}"
    assert lines["exec"] == (
        f"blsshm.errors.BlsError: blsshm.init() in a process that inherited rank 0's environment, started by "
        f"pid {rank0}, not by the launcher (pid {launcher}): {not_a_rank}"), lines["exec"]


ENV = r"""
import os
import blsshm
with blsshm.init() as comm:
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"]
    os.write(1, (" ".join(f"{n}={os.environ[n]}" for n in names) + f" rank={comm.rank}\n").encode())
"""


def test_ranks_find_their_rank_in_torchruns_variables_too(tmp_path):
    res = _launch(tmp_path, "-n", "3", script=ENV)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split("\n")[:-1]) == [
        f"RANK={r} LOCAL_RANK={r} WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 rank={r}" for r in range(3)]


OMP = r"""
import os
import blsshm
with blsshm.init() as comm:
    os.write(1, f"{os.environ.get('OMP_NUM_THREADS')}\n".encode())
"""


@pytest.mark.parametrize("given", [None, "3"])
def test_ranks_get_one_openmp_thread_as_under_torchrun_unless_told(tmp_path, monkeypatch, given):
    # Each of P ranks started as many OpenMP (torch) threads as there are cores.
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    for n, expected in ((2, given or "1"), (1, given)):
        res = _launch(tmp_path, "-n", str(n), script=OMP)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n")[:-1] == [str(expected)] * n


def test_init_twice_says_so(tmp_path):
    # It said the segment did not exist, or that the rank was attached, depending on timing.
    path = tmp_path / "prog.py"
    path.write_text(INIT_TWICE)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(path)],
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    for r in range(2):
        assert f"rank {r}: blsshm.init() was already called in this process (rank {r})" in res.stdout


def _rank_and_args(comm, a, b):
    return (comm.rank, comm.size, comm.lag, a + b)


def test_spawn_returns_results_in_rank_order():
    assert blsshm.spawn(_rank_and_args, 4, lag=3, args=(1, 2)) == [(r, 4, 3, 3) for r in range(4)]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_spawn_with_other_start_methods(start_method):
    """Under forkserver (Python 3.14's default) a rank's parent is the fork server, not the caller."""
    assert blsshm.spawn(_rank_and_args, 2, args=(0, 0), start_method=start_method) == [
        (0, 2, 0, 0), (1, 2, 0, 0)]


def _sums_and_marks(comm, values, marks):
    marks[comm.rank] = comm.rank + 10
    return float(values.sum())


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_spawn_hands_large_arguments_and_shared_arrays_to_new_interpreters(start_method):
    # Arguments of over a pipe's 64 KiB made start() wait for each rank to
    # import the main module.  A RawArray (pickled only as a rank starts) from
    # the arena of spawn's own must still reach the ranks.
    values = np.arange(100_000, dtype=np.float64)  # 800 KB
    marks = multiprocessing.get_context(start_method).RawArray("q", 2)
    assert blsshm.spawn(_sums_and_marks, 2, args=(values, marks), start_method=start_method) == [
        float(values.sum())] * 2
    assert list(marks) == [10, 11]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_what_does_not_pickle_for_new_interpreters_is_named(start_method):
    # Under forkserver (Python 3.14's default) a lambda as fn used to fail
    # with a bare pickling error from deep inside multiprocessing.
    with pytest.raises(blsshm.BlsTypeError, match=rf"^fn \(function\) does not pickle, and ranks "
                                                   rf"started by '{start_method}' get it pickled: .*"
                                                   rf"define it at module level"):
        blsshm.spawn(lambda comm: comm.rank, 2, start_method=start_method)
    with pytest.raises(TypeError, match=r"^args\[1\] \(lock\) does not pickle.*\(start ranks by 'fork'\)$"):
        blsshm.spawn(_sums_and_marks, 2, args=(np.zeros(3), threading.Lock()), start_method=start_method)
    with pytest.raises(blsshm.BlsTypeError, match=r"^target \(function\) does not pickle"):
        blsshm.run_ranks(lambda rank: rank, 2, start_method=start_method)
    assert blsshm.spawn(_rank_and_args, 2, args=(0, 0), start_method=start_method) == [
        (0, 2, 0, 0), (1, 2, 0, 0)]  # and nothing was left behind to stop the next start


UNIMPORTABLE_IN_A_RANK = r"""
import sys
import numpy as np
import blsshm

if __name__ == "__mp_main__":  # the main module, as a rank started by "spawn" imports it
    raise RuntimeError("this module cannot be imported in a rank")

def rank_main(comm, values):
    return values.size

if __name__ == "__main__":
    try:
        blsshm.spawn(rank_main, 2, args=(np.zeros(int(sys.argv[1])),), start_method="spawn")
    except blsshm.RankFailedError as exc:
        print(exc, flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("elements", [10, 100_000])
def test_a_rank_that_cannot_import_the_main_module_is_reported_whatever_its_arguments(tmp_path, elements):
    # With over 64 KiB of arguments start() waited for ever for the dead
    # rank to read them (and held off Ctrl-C and SIGTERM meanwhile).
    path = tmp_path / "unimportable.py"
    path.write_text(UNIMPORTABLE_IN_A_RANK)
    res = subprocess.run([sys.executable, str(path), str(elements)], capture_output=True, text=True, timeout=40)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"rank [01] ended without a result \(exit code 1\)\n", res.stdout), res.stdout
    assert "RuntimeError: this module cannot be imported in a rank" in res.stderr


ONLY_IN_THE_PARENT = r"""
import blsshm

if __name__ == "__main__":
    def rank_main(comm):  # not in the module a rank imports
        return comm.rank

    try:
        blsshm.spawn(rank_main, 2, start_method="spawn")
    except AttributeError as exc:
        print(exc.blsshm_rank, exc, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_function_a_new_interpreter_cannot_find_is_the_ranks_error(tmp_path):
    # It failed as the rank unpickled its Process, before blsshm's code: the
    # parent said only "rank 0 ended without a result (exit code 1)".
    path = tmp_path / "only_in_the_parent.py"
    path.write_text(ONLY_IN_THE_PARENT)
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=40)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"[01] Can't get attribute 'rank_main' on <module '__mp_main__' from '.*'>\n",
                        res.stdout), (res.stdout, res.stderr)


def test_spawn_rejects_bad_arguments():
    with pytest.raises(blsshm.BlsValueError, match="nprocs"):
        blsshm.spawn(_rank_and_args, 0)
    with pytest.raises(blsshm.BlsTypeError, match="callable"):
        blsshm.spawn("not a function", 2)
    with pytest.raises(blsshm.BlsTypeError, match="lag must be an integer, got float"):
        blsshm.spawn(_rank_and_args, 2, lag=1.5)  # was run at lag 1
    with pytest.raises(blsshm.BlsTypeError, match="arena_bytes must be an integer, got NoneType"):
        blsshm.spawn(_rank_and_args, 2, arena_bytes=None)
    # Both ranks ran, then the clean-up failed on it and left a child unreaped.
    for spawner in (blsshm.spawn, blsshm.run_ranks):
        with pytest.raises(blsshm.BlsTypeError, match="grace must be a number of seconds, got '5'"):
            spawner(_rank_and_args, 2, grace="5")
        with pytest.raises(blsshm.BlsValueError, match="grace must be >= 0, got nan"):
            spawner(_rank_and_args, 2, grace=float("nan"))
    assert multiprocessing.active_children() == []


def test_spawn_checks_the_communicator_options_before_starting_anyone(monkeypatch):
    # They were checked in each rank, after every process had started.
    spawn_module = sys.modules["blsshm._spawn"]

    def refuse(*_args, **_kwargs):
        pytest.fail("ranks were started for arguments that should be refused")
    monkeypatch.setattr(spawn_module, "_run_ranks", refuse)
    for kwargs, exc_type, words in [
            (dict(timeout=-1), blsshm.BlsValueError, "timeout must be >= 0"),
            (dict(timeout="x"), blsshm.BlsTypeError, "timeout must be a number of seconds"),
            (dict(spin_us=-1), blsshm.BlsValueError, "spin_us must be a number of microseconds in"),
            (dict(spin_us=float("inf")), blsshm.BlsValueError, "spin_us must be a number of microseconds in"),
            (dict(args="ab"), blsshm.BlsTypeError, "args must be a tuple or list"),  # was fn(comm, "a", "b")
            (dict(args=5), blsshm.BlsTypeError, "args must be a tuple or list")]:
        with pytest.raises(exc_type, match=words):
            blsshm.spawn(_rank_and_args, 2, **kwargs)
    with pytest.raises(blsshm.BlsValueError, match="nprocs must be between 1 and 4096"):
        blsshm.spawn(_rank_and_args, 10 ** 6)  # said "size"


def _return_a_lock(comm):
    import threading
    return threading.Lock()


def test_a_result_that_cannot_be_pickled_is_named_as_the_result():
    with pytest.raises(blsshm.RankFailedError, match="rank 0 returned a lock that cannot be pickled"):
        blsshm.spawn(_return_a_lock, 1)


def test_spawn_takes_numpy_integers_like_the_communicator():
    got = blsshm.spawn(_rank_and_args, np.int64(2), lag=np.int32(1), args=(0, 0), grace=np.float32(1))
    assert got == [(0, 2, 1, 0), (1, 2, 1, 0)]


def _rank_squared(rank, offset):
    if rank == offset:
        raise KeyError(f"rank {rank} refuses")
    return rank * rank + offset


def test_run_ranks_runs_a_function_without_a_communicator():
    assert blsshm.run_ranks(_rank_squared, 3, args=(10,)) == [10, 11, 14]
    with pytest.raises(KeyError, match="rank 1 refuses") as info:
        blsshm.run_ranks(_rank_squared, 3, args=(1,))
    assert info.value.blsshm_rank == 1
    with pytest.raises(blsshm.BlsValueError, match="nprocs"):
        blsshm.run_ranks(_rank_squared, 0)


def _pipes_and_files_open():
    """Our pipes and unnamed files (multiprocessing's heap arenas, which may grow, are neither)."""
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(kind.startswith(("pipe:", "/memfd:")) for kind in kinds)


def _raises_zero_division(comm):
    return 1 / 0


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_failed_runs_leave_no_descriptor_open_with_gc_off(start_method):
    # The exception keeps the ranks' Process objects in its traceback (a
    # cycle through the frames): their pipes stayed open until a collection,
    # two more per rank at each failed call.  Under "spawn" the files that
    # carry a rank's arguments must be closed too.
    gc.disable()
    try:
        before = _pipes_and_files_open()
        for _ in range(3):
            with pytest.raises(KeyError):
                blsshm.run_ranks(_rank_squared, 2, args=(1,), grace=0, start_method=start_method)
            with pytest.raises(ZeroDivisionError):
                blsshm.spawn(_raises_zero_division, 2, grace=0, start_method=start_method)
        assert _pipes_and_files_open() == before
    finally:
        gc.enable()


def _naps(rank, seconds):
    time.sleep(seconds)
    return rank


def _kills_itself(rank):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


@pytest.mark.parametrize("grace", [float("inf"), 3e6, 10 ** 400], ids=["inf", "3e6", "10**400"])
def test_a_grace_period_without_bound_waits_as_long_as_needed(grace):
    # An OverflowError from the waits replaced the results, or the ranks' own error.
    assert blsshm.run_ranks(_rank_squared, 3, args=(10,), grace=grace) == [10, 11, 14]
    with pytest.raises(KeyError, match="rank 1 refuses"):
        blsshm.run_ranks(_rank_squared, 2, args=(1,), grace=grace)
    assert blsshm.spawn(_rank_and_args, 2, args=(0, 0), grace=grace) == [(0, 2, 0, 0), (1, 2, 0, 0)]


def test_spawn_in_a_process_that_ignores_sigchld_still_names_the_signal_that_killed_a_rank():
    # Ignored SIGCHLD let the kernel reap the ranks: "rank 1 ended without a
    # result (no exit code)", and later signals went to a pid that was free.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with pytest.raises(blsshm.RankFailedError, match=r"rank 1 ended without a result \(signal SIGKILL\)"):
            blsshm.run_ranks(_kills_itself, 2)
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN  # as the caller had it
        # A child of the caller's own that ends while the ranks run is reaped, as SIG_IGN asked: no zombie.
        other = subprocess.Popen(["sleep", "0.2"])
        assert blsshm.run_ranks(_naps, 2, args=(2.0,)) == [0, 1]
        assert not os.path.exists(f"/proc/{other.pid}")
    finally:
        signal.signal(signal.SIGCHLD, previous)


class TwoArgumentError(Exception):
    """Pickles, but does not unpickle: its constructor wants more than its args."""

    def __init__(self, what, code):
        super().__init__(f"{what} failed with {code}")


def _raise_unpicklable(rank):
    if rank == 1:
        raise TwoArgumentError("rank 1's step", 7)
    return rank


def _exit_early(rank):
    if rank == 1:
        sys.exit(0)
    return rank


@pytest.mark.parametrize("spawner", [blsshm.spawn, blsshm.run_ranks])
def test_a_bad_start_method_is_refused_before_anything_starts(spawner):
    # It was multiprocessing's ValueError, raised once spawn's segment existed.
    with pytest.raises(blsshm.BlsValueError, match=r"start_method must be one of .*'fork'.* got 'bogus'"):
        spawner(_rank_and_args, 2, start_method="bogus")
    with pytest.raises(blsshm.BlsTypeError, match="start_method must be a str or None, got int"):
        spawner(_rank_and_args, 2, start_method=1)


@pytest.mark.parametrize("variable", ["BLSSHM_SPIN_US", "BLSSHM_LIVENESS_MS", "BLSSHM_PTRACER"])
def test_a_bad_setting_is_refused_by_spawn_before_any_rank_starts(variable, monkeypatch, tmp_path):
    # Every rank started and raised it as it attached.
    monkeypatch.setenv(variable, "soon")
    with pytest.raises(blsshm.BlsValueError, match=variable) as info:
        blsshm.spawn(_rank_and_args, 2, args=(0, 0))
    assert not hasattr(info.value, "blsshm_rank")  # raised here, not re-raised from a rank


def test_a_rank_error_that_does_not_unpickle_still_names_itself_and_its_rank():
    with pytest.raises(blsshm.BlsError, match="TwoArgumentError: rank 1's step failed with 7") as info:
        blsshm.run_ranks(_raise_unpicklable, 2)
    assert info.value.blsshm_rank == 1
    assert "TwoArgumentError" in str(info.value.__cause__)  # the remote traceback


def _raise_what_only_this_rank_can_unpickle(rank):
    if rank == 1:
        module = types.ModuleType("only_in_rank_1")  # the parent has no such module
        sys.modules[module.__name__] = module
        exec("class StepError(Exception):\n    pass", module.__dict__)
        raise module.StepError("rank 1's step failed")
    return rank


def test_a_rank_error_of_a_class_the_parent_cannot_import_keeps_its_message_and_traceback():
    # It reached the parent as "rank 1's result could not be unpickled",
    # with no traceback.
    with pytest.raises(blsshm.BlsError, match="only_in_rank_1.StepError: rank 1's step failed") as info:
        blsshm.run_ranks(_raise_what_only_this_rank_can_unpickle, 2, start_method="fork")
    assert info.value.blsshm_rank == 1
    assert "_raise_what_only_this_rank_can_unpickle" in str(info.value.__cause__)  # the remote traceback


def test_sys_exit_in_a_rank_is_a_failure_not_an_exit_of_the_parent():
    with pytest.raises(blsshm.RankFailedError, match=r"rank 1 called sys.exit\(0\)") as info:
        blsshm.run_ranks(_exit_early, 2)
    assert info.value.blsshm_rank == 1


EXITING = r"""
import multiprocessing.util
import time

import blsshm

def finish(rank):
    time.sleep(0.2)  # e.g. closing a log file
    print(f"rank {rank} finished exiting", flush=True)

def rank_main(comm):
    multiprocessing.util.Finalize(None, finish, args=(comm.rank,), exitpriority=1)  # runs at exit
    print(f"line from rank {comm.rank}")  # block-buffered (stdout is a file): flushed at exit
    return comm.rank

if __name__ == "__main__":
    for _ in range(2):
        assert blsshm.spawn(rank_main, 2) == [0, 1]
"""


def test_ranks_that_returned_are_not_killed_while_they_exit(tmp_path):
    # Ranks were killed as soon as every result was in, before they had
    # exited: output flushed at exit went missing.
    path = tmp_path / "exiting.py"
    path.write_text(EXITING)
    with open(tmp_path / "out.txt", "w") as out:
        res = subprocess.run([sys.executable, str(path)], stdout=out, stderr=subprocess.PIPE,
                             text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "out.txt").read_text()  # two writers: lines may interleave, not vanish
    assert [text.count(f"line from rank {r}") for r in (0, 1)] == [2, 2], text
    assert [text.count(f"rank {r} finished exiting") for r in (0, 1)] == [2, 2], text


def _second_ctrl_c_while_stopping(comm, pid_file):
    if comm.rank == 1:
        # The SIGTERM that stops us comes while spawn waits for us to exit:
        # we answer with the user's second Ctrl-C to spawn, and stay.
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getppid(), signal.SIGINT))
        pid_file.write_text(str(os.getpid()))
    comm.alltoallv(np.zeros(2), [1, 1])  # both are set up
    if comm.rank == 0:
        raise RuntimeError("the first failure")
    time.sleep(60)


def test_a_second_ctrl_c_while_spawn_stops_the_ranks_kills_them(tmp_path):
    # The Ctrl-C cut the clean-up short: rank 1 ran on after spawn returned
    # (a notebook, whose kernel lives on, kept it for good).
    with pytest.raises(KeyboardInterrupt):
        blsshm.spawn(_second_ctrl_c_while_stopping, 2, args=(tmp_path / "pid",), grace=0.2)
    pid = int((tmp_path / "pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # killed and reaped
    os.kill(pid, signal.SIGKILL)
    pytest.fail("rank 1 outlived spawn")


SPAWN_CTRL_C = r"""
import os, time
import blsshm

def rank_main(comm):
    try:
        os.write(1, f"rank {comm.rank} ready\n".encode())
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        time.sleep(0.5)  # saving a checkpoint
        print(f"rank {comm.rank} saved")  # line buffered: survives a stop too
        raise

if __name__ == "__main__":
    try:
        blsshm.spawn(rank_main, 2, grace=20)
    except KeyboardInterrupt:
        print("spawn raised KeyboardInterrupt", flush=True)
"""


def _ctrl_c_to_a_spawning_program(tmp_path, script, ready, only_the_parent=False):
    """Run ``script`` as a terminal would, Ctrl-C it once ``ready(its stdout)`` returned; ``(out, err)``.

    ``only_the_parent``: SIGINT to the parent alone, as ``kill -INT`` or a notebook's interrupt sends it.
    """
    path = tmp_path / "prog.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        ready(parent.stdout)
        if only_the_parent:
            os.kill(parent.pid, signal.SIGINT)
        else:
            os.killpg(parent.pid, signal.SIGINT)  # the terminal's Ctrl-C: parent and ranks
        return parent.communicate(timeout=40)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


@pytest.mark.parametrize("only_the_parent", [False, True], ids=["terminal", "parent only"])
def test_spawn_gives_ranks_the_grace_period_to_act_on_a_ctrl_c(tmp_path, only_the_parent):
    # The parent's KeyboardInterrupt terminated every rank at once, in the
    # middle of the clean-up its handler was doing.  A Ctrl-C that reached
    # only the parent was not passed on: the ranks ran on until the grace
    # period ended, then were stopped without one (for ever with grace=inf).
    # Each rank saves once: one that got the terminal's gets no second.
    def ready(stdout):
        assert sorted(stdout.readline() for _ in range(2)) == ["rank 0 ready\n", "rank 1 ready\n"]
    out, err = _ctrl_c_to_a_spawning_program(tmp_path, SPAWN_CTRL_C, ready, only_the_parent)
    lines = out.splitlines()
    assert sorted(lines[:2]) == ["rank 0 saved", "rank 1 saved"] and lines[2:] == ["spawn raised KeyboardInterrupt"], \
        out + err


RUN_RANKS_CTRL_C_LARGE_REPORTS = r"""
import os, time
import blsshm

def rank_main(rank):
    try:
        os.write(1, f"rank {rank} ready\n".encode())
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise RuntimeError("x" * (8 << 20)) from None  # its report: far more than a pipe holds

if __name__ == "__main__":
    try:
        blsshm.run_ranks(rank_main, 2, grace=3600, start_method="fork")
    except KeyboardInterrupt:
        print("run_ranks raised KeyboardInterrupt", flush=True)
"""


def test_ranks_writing_large_reports_after_a_ctrl_c_end_once_the_parent_stops_reading(tmp_path):
    # Nobody reads reports once the parent is interrupted, and forked ranks
    # held the parent's ends of the pipes open (their own and the earlier
    # ranks'): a rank writing a report larger than a pipe holds waited out
    # the grace period (here an hour: the run outlived the test's wait).
    def ready(stdout):
        assert sorted(stdout.readline() for _ in range(2)) == ["rank 0 ready\n", "rank 1 ready\n"]
    out, err = _ctrl_c_to_a_spawning_program(tmp_path, RUN_RANKS_CTRL_C_LARGE_REPORTS, ready)
    assert out == "run_ranks raised KeyboardInterrupt\n", out + err[-2000:]


SIGINT_MASK_WHILE_STARTING = r"""
import multiprocessing.process, signal, sys
import blsshm

blocked = []
start = multiprocessing.process.BaseProcess.start

def noting_start(self):
    start(self)
    blocked.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

def rank_main(comm):
    return comm.rank

if __name__ == "__main__":
    multiprocessing.process.BaseProcess.start = noting_start
    blsshm.spawn(rank_main, 2, start_method=sys.argv[1])
    print(blocked)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_ctrl_c_stays_blocked_while_every_rank_starts(tmp_path, start_method):
    # Under "spawn", a fresh program's first start started the resource
    # tracker, which unblocks SIGINT on its way out: a Ctrl-C to the parent
    # during the other starts was then ignored (the shield's SIG_IGN), lost.
    path = tmp_path / "prog.py"
    path.write_text(SIGINT_MASK_WHILE_STARTING)
    done = subprocess.run([sys.executable, str(path), start_method], capture_output=True, text=True, timeout=60)
    assert done.stdout == "[True, True]\n", done.stdout + done.stderr


SPAWN_CTRL_C_WHILE_STARTING = r"""
import os, sys, time
import blsshm

def first_to_start():  # atomic: two ranks importing at once must not both pass as the first
    try:
        os.close(os.open(MARK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

if __name__ != "__main__":  # a rank importing this module ("spawn")
    if ALL_STARTING or not first_to_start():
        time.sleep(3)  # still starting up; the first rank goes on into rank_main

def rank_main(comm):
    try:
        os.write(1, b"running\n")  # inside: a Ctrl-C right after it is handled too
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        time.sleep(4)  # saving: a starting rank would reach rank_main long before this ends
        raise

if __name__ == "__main__":
    print("starting", flush=True)
    try:
        blsshm.spawn(rank_main, 2, grace=30, start_method="spawn")
    except KeyboardInterrupt:
        print("spawn raised KeyboardInterrupt", flush=True)
"""


@pytest.mark.parametrize("running", [0, 1])
def test_a_ctrl_c_stops_starting_ranks_at_once(tmp_path, running):
    # Starting ranks ignore Ctrl-C (shielded).  Given the grace period, or
    # stopped only after a running rank's grace, they went on into rank_main.
    def ready(stdout):
        assert stdout.readline() == "starting\n"
        if running:
            assert stdout.readline() == "running\n"
        else:
            time.sleep(0.5)  # the ranks are in their 3 s of start-up
    script = SPAWN_CTRL_C_WHILE_STARTING.replace("ALL_STARTING", str(not running)).replace(
        "MARK", repr(str(tmp_path / "first")))
    out, err = _ctrl_c_to_a_spawning_program(tmp_path, script, ready)
    assert out == "spawn raised KeyboardInterrupt\n", out + err  # no starting rank ran


SPAWN_CTRL_C_DURING_THE_STARTS = r"""
import multiprocessing.context, os, pathlib, signal, sys, time
import blsshm

RUNNING = pathlib.Path(sys.argv[1])
real_start = multiprocessing.context.ForkProcess.start

def start_after_a_ctrl_c(self):
    if self.name == "blsshm-rank-1":  # rank 0 runs its function: the terminal's Ctrl-C comes now
        while not RUNNING.exists():
            time.sleep(0.01)
        os.killpg(0, signal.SIGINT)  # held here until every rank started
    real_start(self)

multiprocessing.context.ForkProcess.start = start_after_a_ctrl_c

def rank_main(rank):
    try:
        if rank == 0:
            RUNNING.write_text("")
        time.sleep(30)
    except KeyboardInterrupt:
        time.sleep(1)  # saving
        os.write(1, f"rank {rank} saved\n".encode())
        raise

if __name__ == "__main__":
    print("starting", flush=True)
    try:
        blsshm.run_ranks(rank_main, 2, grace=30, start_method="fork")
    except KeyboardInterrupt:
        print("run_ranks raised KeyboardInterrupt", flush=True)
"""


def test_a_ctrl_c_during_the_starts_gives_running_ranks_the_grace_period(tmp_path):
    # It surfaced as the starts ended, outside the handler that gives the
    # grace period: rank 0 was stopped in the middle of its saving.
    path = tmp_path / "prog.py"
    path.write_text(SPAWN_CTRL_C_DURING_THE_STARTS)
    parent = subprocess.Popen([sys.executable, str(path), str(tmp_path / "running")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group
    try:
        out, err = parent.communicate(timeout=40)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert "rank 0 saved\n" in out and out.endswith("run_ranks raised KeyboardInterrupt\n"), out + err


def _starts_a_child(comm, pid_file):
    if comm.rank == 1:
        child = subprocess.Popen(["sleep", "60"])
        pid_file.write_text(str(child.pid))
    comm.alltoallv(np.zeros(2), [1, 1])  # rank 0 fails only once the child runs
    if comm.rank == 0:
        raise RuntimeError("rank 0 fails")
    time.sleep(60)


def test_spawn_stops_what_a_rank_it_stops_started(tmp_path):
    # The rank got SIGTERM, and its child ran on (reparented to init).
    with pytest.raises(RuntimeError, match="rank 0 fails"):
        blsshm.spawn(_starts_a_child, 2, args=(tmp_path / "pid",), grace=0.2)
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 20  # it got SIGTERM before spawn returned; it dies when scheduled
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if running(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child rank 1 started outlived spawn")


def _many_iterations(comm, iters):
    send = np.arange(comm.size * 4, dtype=np.float32)
    for _ in range(iters):
        recv, _ = comm.alltoallv(send, [4] * comm.size)
    return comm.next_complete, comm.stats["futex_sleeps"]


def test_eight_ranks_on_two_cores_finish():
    """Oversubscribed (8 ranks, 2 cores): waits must sleep, and the run must finish."""
    results = blsshm.spawn(_many_iterations, 8, args=(2000,))
    assert [done for done, _ in results] == [2000] * 8


def _termination_signals_as_found(comm):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return [(signal.getsignal(s) == signal.SIG_DFL, s in blocked) for s in (signal.SIGTERM, signal.SIGHUP)]


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_ranks_and_the_caller_keep_termination_signals_at_their_default(start_method):
    # While ranks run, spawn handles SIGTERM and SIGHUP (below); its ranks,
    # forked with that handler or not, must not keep it (a rank would raise
    # instead of dying), nor the caller once spawn returns.
    results = blsshm.spawn(_termination_signals_as_found, 2, start_method=start_method)
    assert results == [[(True, False), (True, False)]] * 2
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == [signal.SIG_DFL] * 2


SPAWN_TERMINATED = r"""
import os, signal, subprocess, sys, time
import blsshm

def rank_main(comm, pid_file):
    if comm.rank == 0:
        def save(signum, frame):
            print("rank 0 got SIGTERM")  # line buffered: written before it exits
            sys.exit(1)
        signal.signal(signal.SIGTERM, save)
    else:
        child = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a worker
        with open(pid_file, "w") as f:
            f.write(str(child.pid))
    os.write(1, f"rank {comm.rank} ready\n".encode())
    while True:
        time.sleep(0.05)

if __name__ == "__main__":
    blsshm.spawn(rank_main, 2, args=(sys.argv[1],), grace=30)
    print("spawn returned")
"""


@contextlib.contextmanager
def _program_in_own_session(tmp_path, script, *args):
    """Run ``script`` (text) leading a session of its own; afterwards kill what is left of the session."""
    path = tmp_path / "prog.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        yield parent
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group outlives a parent that died first
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_termination_signal_to_the_spawning_process_stops_the_ranks_first(tmp_path, signum):
    # docker stop, a service manager or kill: the parent died at once, the
    # ranks died of their parent-death SIGKILL (rank 0 never got to act), and
    # the child rank 1 started ran on.  Now the ranks are stopped as after a
    # failure, and the parent then dies of the signal it got.
    pid_file = tmp_path / "pid"
    with _program_in_own_session(tmp_path, SPAWN_TERMINATED, str(pid_file)) as parent:
        ready = sorted(parent.stdout.readline() for _ in range(2))
        assert ready == ["rank 0 ready\n", "rank 1 ready\n"], ready
        parent.send_signal(signum)  # to the parent alone
        out, err = parent.communicate(timeout=40)
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 20  # it got SIGTERM before the parent ended; it dies when scheduled
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running(child), "the child rank 1 started outlived the terminated spawn"
    assert parent.returncode == -signum, out + err
    assert out == "rank 0 got SIGTERM\n", out + err


SPAWN_TERMINATED_IN_GRACE = r"""
import os, signal, sys, time
import blsshm

def rank_main(comm):
    def stop(signum, frame):
        print(f"rank {comm.rank} got SIGTERM")
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    try:
        os.write(1, f"rank {comm.rank} ready\n".encode())
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        os.write(1, f"rank {comm.rank} saving\n".encode())
        time.sleep(60)  # a long save: the parent waits for it in the grace period
        raise

if __name__ == "__main__":
    blsshm.spawn(rank_main, 2, grace=60)
"""


def test_a_termination_signal_during_the_grace_period_still_lets_ranks_act_on_sigterm(tmp_path):
    # It cut the wait for the ranks' grace period (after a Ctrl-C) short as a
    # second Ctrl-C does: SIGKILL for every rank, and no chance to act.
    with _program_in_own_session(tmp_path, SPAWN_TERMINATED_IN_GRACE) as parent:
        ready = sorted(parent.stdout.readline() for _ in range(2))
        assert ready == ["rank 0 ready\n", "rank 1 ready\n"], ready
        os.killpg(parent.pid, signal.SIGINT)  # a terminal's Ctrl-C
        saving = sorted(parent.stdout.readline() for _ in range(2))
        assert saving == ["rank 0 saving\n", "rank 1 saving\n"], saving
        time.sleep(0.5)  # the parent is in the ranks' 60 s of grace
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=30)
    assert parent.returncode == -signal.SIGTERM, out + err
    assert sorted(out.splitlines()) == ["rank 0 got SIGTERM", "rank 1 got SIGTERM"], out + err


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


NO_INIT = r"""
import os, sys
import numpy as np
import blsshm
if os.environ["BLSSHM_RANK"] == "1":
    sys.exit(0)  # forgot blsshm.init()
with blsshm.init() as comm:
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
"""


def test_a_rank_that_exits_without_attaching_is_reported_to_the_others(tmp_path):
    # The others waited for it attach_timeout (60 s), then timed out.
    # Tagged: the two ranks' tracebacks, written at once, would interleave mid-line.
    res = _launch(tmp_path, "-n", "3", "--tag-output", script=NO_INIT)
    assert "rank 1 was lost: it exited (exit code 0) without attaching" in res.stderr
    lines = res.stderr.split("\n")
    for r in (0, 2):
        assert sum(line.startswith(f"[rank {r}] blsshm.errors.PeerLostError: rank 1 was lost")
                   for line in lines) == 1, res.stderr
    assert res.returncode == 1


CTRL_C = r"""
import os, time
import blsshm
with blsshm.init() as comm:
    try:
        os.write(1, f"rank {comm.rank} ready\n".encode())  # one write: lines never interleave
        while True:  # short sleeps: a signal landing just before one is acted on when it ends
            time.sleep(0.05)
    except KeyboardInterrupt:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:  # saving a checkpoint: a second Ctrl-C would cut it short
            pass
        os.write(1, f"rank {comm.rank} saved\n".encode())
"""


def _start_in_own_group(tmp_path, script, *args):
    """The launcher as a terminal starts it: leading the foreground process group."""
    path = tmp_path / "prog.py"
    path.write_text(script)
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", *args, str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        ready = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["rank 0 ready\n", "rank 1 ready\n"]
    except BaseException:
        launcher.kill()  # the ranks die with it
        launcher.wait()
        raise
    return launcher


def test_ctrl_c_reaches_every_rank_once(tmp_path):
    # Ranks shared the terminal's process group, so they got the terminal's
    # SIGINT and the launcher's copy: the second cut their handlers short.
    launcher = _start_in_own_group(tmp_path, CTRL_C, "-n", "2")
    try:
        os.killpg(launcher.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
        launcher.wait()
    assert sorted(out.split("\n")[:-1]) == ["rank 0 saved", "rank 1 saved"]
    assert launcher.returncode == 0  # the ranks handled it: theirs to decide, as a shell does


DIES_OF_CTRL_C = CTRL_C.replace("except KeyboardInterrupt:", "except ZeroDivisionError:")


def test_ranks_that_die_of_a_ctrl_c_make_a_shell_loop_stop(tmp_path):
    # The launcher exited with status 130: a shell takes that for a program
    # that handled Ctrl-C itself, and went on with the loop's next run.
    path = tmp_path / "prog.py"
    path.write_text(DIES_OF_CTRL_C)
    loop = (f'for i in 1 2; do echo "run $i"; "{sys.executable}" -m blsshm.run -n 2 "{path}"; done; '
            'echo "loop ended"')
    shell = subprocess.Popen(["bash", "-c", loop], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert shell.stdout.readline() == "run 1\n"
        assert sorted(shell.stdout.readline() for _ in range(2)) == ["rank 0 ready\n", "rank 1 ready\n"]
        os.killpg(shell.pid, signal.SIGINT)  # Ctrl-C: the shell and the launcher get it
        out, err = shell.communicate(timeout=30)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert out == "", out  # neither "run 2" nor "loop ended"
    assert "rank 0 failed (signal SIGINT)" in err and "rank 1 failed (signal SIGINT)" in err, err
    assert shell.returncode == -signal.SIGINT


IGNORES_CTRL_C = r"""
import os, signal, time
import blsshm
with blsshm.init() as comm:
    # Ignores it, as a rank stuck in a C call would, but says it came.
    signal.signal(signal.SIGINT, lambda *_: os.write(1, f"rank {comm.rank} got it\n".encode()))
    os.write(1, f"rank {comm.rank} ready\n".encode())  # one write: lines never interleave
    time.sleep(1000)
"""


def test_a_second_ctrl_c_kills_ranks_that_ignore_the_first(tmp_path):
    launcher = _start_in_own_group(tmp_path, IGNORES_CTRL_C, "-n", "2")
    try:
        os.killpg(launcher.pid, signal.SIGINT)
        # Passed on before the second comes (else the two could merge into one).
        assert sorted(launcher.stdout.readline() for _ in range(2)) == ["rank 0 got it\n", "rank 1 got it\n"]
        assert launcher.poll() is None  # the first is the ranks' to handle
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=30)
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == -signal.SIGINT  # killed for the user's Ctrl-C: interrupted by it


IGNORES_SIGTERM = IGNORES_CTRL_C.replace("SIGINT", "SIGTERM")


def test_ranks_still_running_after_the_stop_timeout_of_a_passed_on_signal_are_killed(tmp_path):
    # The launcher waited for ever: a service manager's one SIGTERM never ended the run.
    launcher = _start_in_own_group(tmp_path, IGNORES_SIGTERM, "-n", "2", "--stop-timeout", "0.5")
    try:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        err = launcher.stderr.read()
    finally:
        launcher.kill()
        launcher.wait()
    assert "rank(s) [0, 1] still running 0.5 s after SIGTERM was passed on to them; killing them" in err
    assert "rank 0 failed (signal SIGKILL)" in err
    assert launcher.returncode == -signal.SIGTERM


SAVES_WHILE_A_PEER_FAILS = r"""
import os, resource, signal, time
import blsshm

class Stop(Exception):
    pass

def stop(signum, frame):
    raise Stop

signal.signal(signal.SIGNUM, stop)
with blsshm.init() as comm:
    try:
        os.write(1, f"rank {comm.rank} ready\n".encode())  # one write: lines never interleave
        while True:
            time.sleep(0.05)
    except Stop:
        if comm.rank == 1:
            if HOW == "dies of it":
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
                signal.signal(signal.SIGNUM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGNUM)
            os._exit(3)  # fails at once
        time.sleep(4)  # saving a checkpoint (or writing a core): far longer than --grace
        os.write(1, b"rank 0 saved\n")
"""


@pytest.mark.parametrize("signum, how", [(signal.SIGINT, "exits 3"), (signal.SIGTERM, "exits 3"),
                                         (signal.SIGQUIT, "dies of it"), (signal.SIGQUIT, "exits 3")])
def test_a_rank_failing_of_a_passed_on_signal_leaves_the_others_the_stop_timeout(tmp_path, signum, how):
    # Rank 1's failure started the grace period: rank 0, saving its work
    # after the same signal, got SIGTERM 0.2 s later, not --stop-timeout.
    # Ctrl-\ sets no stop timeout: there a rank's own failure (exit 3)
    # still starts the grace period, or the launcher could wait for ever.
    name = signal.Signals(signum).name
    script = SAVES_WHILE_A_PEER_FAILS.replace("SIGNUM", name).replace("HOW", repr(how))
    launcher = _start_in_own_group(tmp_path, script, "-n", "2", "--grace", "0.2", "--stop-timeout", "30")
    try:
        launcher.send_signal(signum)
        out, err = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
        launcher.wait()
    own_failure = signum == signal.SIGQUIT and how == "exits 3"
    assert out == ("" if own_failure else "rank 0 saved\n"), err
    assert ("still running 0.2 s after the first failure; sending SIGTERM" in err) == own_failure, err
    if how == "dies of it":
        assert "rank 1 failed (signal SIGQUIT)" in err and launcher.returncode == 128 + signum, err
    else:
        assert "rank 1 failed (exit code 3)" in err and launcher.returncode == 3, err


def test_a_signal_before_any_rank_started_is_not_a_success(monkeypatch, capfd, tmp_path):
    # Between the handlers and the first rank: no rank failed, so the status was 0.
    from blsshm import run
    real_isatty = os.isatty

    def isatty_then_sigterm(fd):  # called once the handlers are in place, before the first rank
        os.kill(os.getpid(), signal.SIGTERM)
        return real_isatty(fd)
    monkeypatch.setattr(os, "isatty", isatty_then_sigterm)
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    assert run.main(["-n", "2", str(path), "5"]) == 128 + signal.SIGTERM
    assert "failed" not in capfd.readouterr().err  # no rank started


def test_a_signal_while_a_rank_starts_reaches_it_and_starts_no_more(tmp_path, monkeypatch, capfd):
    # The handler ran before the new rank was listed: it never got the signal,
    # and the launcher went on to start the rest as if nothing had come.
    from blsshm import run
    real_popen = subprocess.Popen

    def popen_with_a_sigterm(*args, **kwargs):
        if kwargs.get("preexec_fn"):  # a rank (the segment's reaper starts without)
            os.kill(os.getpid(), signal.SIGTERM)  # held until this rank has started
        return real_popen(*args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", popen_with_a_sigterm)
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    assert run.main(["-n", "2", str(path), "5"]) == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "rank 0 failed (signal SIGTERM)" in err and "rank 1 failed" not in err, err
    assert "rank 1 was lost: the launcher got SIGTERM before it started it" in err, err  # never started


TAKES_THE_SIGNAL_AND_ATTACHES = r"""
import os, pathlib, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a handler that takes it and goes on
pathlib.Path(sys.argv[1]).write_text("ready")
import numpy as np
import blsshm
comm = blsshm.init()
if sys.argv[2] == "returns":
    sys.exit(0)
try:
    comm.alltoallv(np.zeros(comm.size), np.ones(comm.size, np.int64))  # waits for every rank to attach
except blsshm.BlsError as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rank_0", ["exchanges", "returns"])
def test_ranks_that_take_a_signal_which_stopped_the_starts_hear_the_others_never_come(
        tmp_path, monkeypatch, capfd, rank_0):
    # Rank 0 waited for rank 1 to attach until its attach timeout (60 s);
    # one that returned made a run whose rank 1 never ran a success.
    from blsshm import run
    real_popen = subprocess.Popen
    ready = tmp_path / "ready"

    def popen_then_sigterm_once_it_runs(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        if kwargs.get("preexec_fn"):  # a rank (the segment's reaper starts without)
            while not ready.exists():  # its SIGTERM handler is in place
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # held until this rank is listed
        return proc
    monkeypatch.setattr(subprocess, "Popen", popen_then_sigterm_once_it_runs)
    path = tmp_path / "prog.py"
    path.write_text(TAKES_THE_SIGNAL_AND_ATTACHES)
    status = run.main(["-n", "2", "--stop-timeout", "1000", str(path), str(ready), rank_0])
    out = capfd.readouterr().out
    if rank_0 == "returns":
        assert status == 128 + signal.SIGTERM and out == ""
    else:
        assert status == 3
        assert out.startswith("PeerLostError") and "the launcher got SIGTERM before it started it" in out, out


SLOW_TO_ATTACH = r"""
import os, time
import blsshm
os.write(1, b"started\n")
time.sleep(30)  # importing torch, say
blsshm.init()
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_a_hangup_before_every_rank_attached_leaves_no_segment(tmp_path, signum):
    # The launcher died of the default action, skipping the unlink of the segment.
    path = tmp_path / "prog.py"
    path.write_text(SLOW_TO_ATTACH)
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "2", str(path)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert [launcher.stdout.readline() for _ in range(2)] == [b"started\n"] * 2
        os.kill(launcher.pid, signum)  # the terminal closed (or Ctrl-\): to the launcher alone
        launcher.wait(timeout=30)
    finally:
        launcher.kill()
        launcher.wait()
    # Passed on to the ranks, which died of it; and so, as a shell expects,
    # did the launcher, but with no core dump of its own for Ctrl-\.
    assert launcher.returncode == (128 + signum if signum == signal.SIGQUIT else -signum)
    # The fixture checks that no segment and no rank is left.


def _gone(path):
    """Wait (under the test's timeout) until ``path`` no longer exists."""
    while os.path.exists(path):
        time.sleep(0.02)
    return True


SAYS_ITS_SEGMENT = SLOW_TO_ATTACH.replace('b"started\\n"', 'os.environ["BLSSHM_NAME"].encode() + b"\\n"')


def test_a_launcher_killed_before_every_rank_attached_leaves_no_segment(tmp_path):
    # SIGKILL runs no handler: the segment stayed in /dev/shm for good, its memory with it.
    path = tmp_path / "prog.py"
    path.write_text(SAYS_ITS_SEGMENT)
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "2", str(path)], cwd=tmp_path,
                                stdout=subprocess.PIPE, start_new_session=True)
    try:
        names = {launcher.stdout.readline().decode().strip() for _ in range(2)}
        assert len(names) == 1 and os.path.exists("/dev/shm" + min(names))
        launcher.kill()
        launcher.wait()
    finally:
        launcher.kill()
        launcher.wait()
    assert _gone("/dev/shm" + names.pop())  # the ranks die with the launcher, and the fixture checks


KILLED_CREATOR = r"""
import os, sys, time
from blsshm import segment
name = segment.create(2, 0, 4096, reaped=True)
child = os.fork()
if child == 0:
    time.sleep(1000)  # a child holding everything the creator had open
    os._exit(0)
os.write(1, f"{name} {child}\n".encode())
time.sleep(1000)
"""


@pytest.mark.parametrize("path", ["inherited", "without rm"])
def test_the_reaper_removes_the_segment_of_a_killed_creator_whatever_its_children_hold(path):
    env = dict(os.environ, PATH="/nonexistent") if path == "without rm" else None
    creator = subprocess.Popen([sys.executable, "-c", KILLED_CREATOR], stdout=subprocess.PIPE, text=True, env=env)
    child = None
    try:
        name, child = creator.stdout.readline().split()
        assert os.path.exists("/dev/shm" + name)
        creator.kill()
        creator.wait()
        assert _gone("/dev/shm" + name)
    finally:
        creator.kill()
        creator.wait()
        if child is not None:
            os.kill(int(child), signal.SIGKILL)  # the creator's child: not ours to wait for


A_CREATOR_ALONE = """
import time
import blsshm
comm = blsshm.Comm.create(2, arena_bytes=1 << 16)
print(comm.name, flush=True)
time.sleep(1000)  # rank 1 never comes
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_comm_create_creator_killed_before_every_rank_attached_leaves_no_segment(signum):
    creator = subprocess.Popen([sys.executable, "-c", A_CREATOR_ALONE], stdout=subprocess.PIPE, text=True)
    try:
        name = creator.stdout.readline().strip()
        assert os.path.exists("/dev/shm" + name)
        creator.send_signal(signum)
        assert creator.wait() == -signum
        assert _gone("/dev/shm" + name)  # no rank will ever attach to unlink it
    finally:
        creator.kill()
        creator.wait()


@pytest.mark.parametrize("error", [OSError(errno.EMFILE, "Too many open files"),
                                   OSError(errno.ENOSPC, "No space left on device"),
                                   "PermissionsError"])
def test_a_segment_that_cannot_be_made_is_a_clean_error(monkeypatch, error):
    from blsshm import segment
    import posix_ipc
    if error == "PermissionsError":
        error = posix_ipc.PermissionsError("Permission denied")

    def refuse(*_args, **_kwargs):
        raise error
    monkeypatch.setattr(posix_ipc, "SharedMemory", refuse)
    with pytest.raises(BlsError, match="cannot create a segment in /dev/shm for 2 ranks: " + re.escape(str(error))):
        blsshm.Comm.create(2)
    assert not segment._reapers  # stopped, and nothing was made


WHERE_STDIN_IS = r"""
import os
import blsshm
with blsshm.init() as comm:
    # One write per rank: the ranks share the pipe and run unbuffered, so a print of
    # several items could interleave with the other rank's.
    os.write(1, f"{comm.rank} {os.path.realpath('/proc/self/fd/0')}\n".encode())
"""


@pytest.mark.parametrize("stdin", ["terminal", "file"])
def test_ranks_read_dev_null_when_the_launcher_reads_a_terminal(tmp_path, stdin):
    # Else every rank would compete with the user's shell for the keyboard.
    path, data = tmp_path / "prog.py", tmp_path / "input.txt"
    path.write_text(WHERE_STDIN_IS)
    data.write_text("x\n")
    master, slave = os.openpty()
    try:
        with open(data) as f:
            res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(path)],
                                 stdin=slave if stdin == "terminal" else f, capture_output=True,
                                 text=True, timeout=50)
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 0, res.stderr
    want = "/dev/null" if stdin == "terminal" else str(data.resolve())
    assert sorted(res.stdout.splitlines()) == [f"0 {want}", f"1 {want}"]


A_CREATOR_THAT_FAILS_EARLY = """
import sys
import blsshm
comm = blsshm.Comm.create(2, 0, lag=1)
print(comm.name, flush=True)
if sys.argv[1] == "raise":
    raise RuntimeError("a peer failed to start")
"""


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_creator_that_never_closes_exits(how):
    # The comm is closed by its __del__ at interpreter shutdown, which stops
    # the reaper; a thread started for that then (Python <= 3.11) never ran,
    # and the process hung in Thread.start() forever.
    res = subprocess.run([sys.executable, "-c", A_CREATOR_THAT_FAILS_EARLY, how],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == (1 if how == "raise" else 0), res.stderr
    assert ("RuntimeError: a peer failed to start" in res.stderr) == (how == "raise")
    assert not os.path.exists("/dev/shm" + res.stdout.strip())


def test_a_ctrl_c_after_the_rank_mapped_its_views_still_releases_it(monkeypatch):
    # The cleanup closed the mapping while the rank's views still used it:
    # BufferError replaced the KeyboardInterrupt, and the rank's lock stayed
    # held, so its peers saw it alive (attached) and waited.
    attach = blsshm.Comm._attach_mapping

    def attach_then_interrupt(self, *args):
        attach(self, *args)
        raise KeyboardInterrupt
    with blsshm.Comm.create(2, 0) as creator:
        monkeypatch.setattr(blsshm.Comm, "_attach_mapping", attach_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            blsshm.Comm.attach(creator.name, 1)
        monkeypatch.undo()
        with pytest.raises(blsshm.PeerLostError, match="rank 1"):
            creator.alltoallv(np.zeros(2), [1, 1], timeout=20)


def test_a_creator_that_cannot_start_a_reaper_goes_without(monkeypatch):
    from blsshm import segment
    monkeypatch.setattr(segment, "REAPER_SHELL", "/nonexistent/sh")
    name = segment.create(2, 0, 4096, reaped=True)
    assert os.path.exists("/dev/shm" + name) and name not in segment._reapers
    segment.unlink(name)
    assert not os.path.exists("/dev/shm" + name)


@pytest.mark.parametrize("reaped", [False, True], ids=["unreaped", "reaped"])
def test_a_segment_name_already_taken_is_left_alone_and_another_is_drawn(monkeypatch, reaped):
    # O_EXCL refused the name, and create() then unlinked it: another
    # communicator's segment, whose ranks could no longer attach.
    from blsshm import segment
    theirs = segment.create(2, 0, 4096)
    try:
        drawn = iter([theirs[len(segment.PREFIX):], "ab" * 16])
        monkeypatch.setattr(segment.secrets, "token_hex", lambda _n: next(drawn))
        ours = segment.create(2, 0, 4096, reaped=reaped)
        assert ours == segment.PREFIX + "ab" * 16 and theirs not in segment._reapers
        segment.unlink(ours)
        assert os.path.exists("/dev/shm" + theirs)
        monkeypatch.setattr(segment.secrets, "token_hex", lambda _n: theirs[len(segment.PREFIX):])
        with pytest.raises(BlsError, match="3 random names in a row were taken"):
            segment.create(2, 0, 4096, reaped=reaped)
        assert os.path.exists("/dev/shm" + theirs) and theirs not in segment._reapers
    finally:
        segment.unlink(theirs)


def test_a_missing_shm_directory_is_said_not_taken_for_a_taken_name(monkeypatch):
    # posix_ipc raises ExistentialError for ENOENT too.
    from blsshm import segment

    def no_dev_shm(*_args, **_kwargs):
        raise segment.posix_ipc.ExistentialError("No such file or directory")

    monkeypatch.setattr(segment.posix_ipc, "SharedMemory", no_dev_shm)
    with pytest.raises(BlsError, match="cannot create a segment in /dev/shm for 2 ranks: No such file"):
        segment.create(2, 0, 4096, reaped=True)
    assert not segment._reapers


@pytest.mark.parametrize("pipe", ["closed", "held elsewhere"])
def test_a_reaped_segment_unlinked_by_its_creator_stops_its_reaper(pipe):
    # "held elsewhere": a process forked from C, past our fork handler, keeps
    # a copy of the pipe; the reaper must not wait for that one to end.
    from blsshm import segment
    name = segment.create(2, 0, 4096, reaped=True)
    proc, write_end = segment._reapers[name]
    copy = os.dup(write_end) if pipe == "held elsewhere" else None
    try:
        segment.unlink(name)  # tells it, and leaves the waiting for its exit to a thread
        assert name not in segment._reapers and not os.path.exists("/dev/shm" + name)
        assert proc.wait(timeout=20) == 0
    finally:
        if copy is not None:
            os.close(copy)


def test_a_reaper_acts_only_on_its_creators_word_or_death():
    # Stray output on its pipe (a creator started with fd 2 closed gets the
    # pipe as its stderr) must not make it remove a segment still in use.
    from blsshm import segment
    name = segment.create(2, 0, 4096, reaped=True)
    proc, write_end = segment._reapers[name]
    try:
        os.write(write_end, b"a warning on stderr\nunlinked but not\n")
        time.sleep(0.5)  # long enough for a reaper that acted on those lines to have removed it
        assert os.path.exists("/dev/shm" + name) and proc.poll() is None
    finally:
        segment.unlink(name)
    assert proc.wait(timeout=20) == 0


TELLS_A_KILLED_REAPER = r"""
import signal
from blsshm import segment
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as command-line tools do
name = segment.create(2, 0, 4096, reaped=True)
proc, _ = segment._reapers[name]
proc.kill()  # by hand
proc.wait()
segment.unlink(name)  # tells it: nobody reads that any more
print("alive")
"""


def test_a_creator_outlives_telling_a_reaper_killed_by_hand(tmp_path):
    # Its write to the reaper's closed pipe raised SIGPIPE, which killed it.
    path = tmp_path / "creator.py"
    path.write_text(TELLS_A_KILLED_REAPER)
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=50)
    assert (res.returncode, res.stdout) == (0, "alive\n"), res.stderr


STOPS_ON_THE_TERMINAL = r"""
import os, signal
import numpy as np
import blsshm
with blsshm.init() as comm:
    if comm.rank == 1:
        os.kill(os.getpid(), signal.SIGTTIN)  # what reading the terminal does to a background group
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
"""


def test_a_rank_stopped_by_the_terminal_is_killed_and_named(tmp_path):
    # The launcher waited for it forever (a stopped rank looked like a running one).
    path = tmp_path / "prog.py"
    path.write_text(STOPS_ON_THE_TERMINAL)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path)],
                         capture_output=True, text=True, timeout=50, start_new_session=True)
    assert "rank 1 was stopped by SIGTTIN: it read from the terminal" in res.stderr, res.stderr
    assert "[rank 0] blsshm.errors.PeerLostError: rank 1 was lost" in res.stderr, res.stderr
    assert res.returncode == 128 + signal.SIGKILL


LEAVES_A_CHILD = r"""
import subprocess, sys, time
import numpy as np
import blsshm
with blsshm.init() as comm:
    if comm.rank == 1:  # before rank 0 fails: a slow rank 1 could be stopped before it got here
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        with open(sys.argv[1], "w") as f:
            f.write(str(child.pid))
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
    if comm.rank == 0:
        raise RuntimeError("rank 0 fails")
    while True:  # busy, never calls the communicator again: killed after the grace period
        time.sleep(0.1)
"""


def test_the_launcher_kills_what_its_ranks_started(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(LEAVES_A_CHILD)
    pid_file = tmp_path / "child.pid"
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--grace", "2", str(path),
                          str(pid_file)], capture_output=True, text=True, timeout=50)
    child = int(pid_file.read_text())
    try:
        assert res.returncode == 1 and "rank 0 failed (exit code 1)" in res.stderr
        for _ in range(100):  # SIGKILLed before the launcher returned; its reaper may lag
            if not running(child):
                break
            time.sleep(0.05)
        assert not running(child)
    finally:
        _kill_all([child])


SIGTERM_THEN_SIGKILL = r"""
import os, signal, sys, time
import numpy as np
import blsshm

def on_term(signum, frame):
    os.write(1, b"rank 1 saved its work\n")
    sys.exit(0)

with blsshm.init() as comm:
    if comm.rank == 1:  # before rank 0 can fail: the grace period is short
        signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "ignore" else on_term)
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
    if comm.rank == 0:
        raise RuntimeError("rank 0 fails")
    while True:  # busy, never calls the communicator again: outlives the grace period
        time.sleep(0.05)
"""


@pytest.mark.parametrize("rank1", ["handle", "ignore"])
def test_ranks_outliving_the_grace_period_get_sigterm_then_sigkill(tmp_path, rank1):
    # They got SIGKILL at once: a handler could not save anything.
    path = tmp_path / "prog.py"
    path.write_text(SIGTERM_THEN_SIGKILL)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--grace", "0.2", str(path), rank1],
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 1 and "rank 0 failed (exit code 1)" in res.stderr, res.stderr
    assert "rank(s) [1] still running 0.2 s after the first failure; sending SIGTERM" in res.stderr
    if rank1 == "handle":
        assert res.stdout == "rank 1 saved its work\n"
        assert "after SIGTERM; killing them" not in res.stderr
    else:
        assert res.stdout == ""
        assert "rank(s) [1] still running 2 s after SIGTERM; killing them" in res.stderr


def _fail_or_wait_for_sigterm(comm, flag_file):
    def on_term(signum, frame):
        with open(flag_file, "w") as f:
            f.write("saved")
        os._exit(0)
    if comm.rank == 1:
        signal.signal(signal.SIGTERM, on_term)
    comm.alltoallv(np.zeros(2), [1, 1])  # rank 0 fails only once rank 1 has its handler
    if comm.rank == 0:
        raise ValueError("rank 0 fails")
    while True:
        time.sleep(0.05)


def test_spawn_sends_sigterm_before_sigkill(tmp_path):
    flag = tmp_path / "saved"
    with pytest.raises(ValueError, match="rank 0 fails"):
        blsshm.spawn(_fail_or_wait_for_sigterm, 2, args=(str(flag),), grace=0.2)
    assert flag.read_text() == "saved"


def _sleep_forever(pid_file):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1000)


def _kill_the_sleeper(pid_file):
    """Kill the process ``_sleep_forever`` runs in, once it has written its pid (up to 5 s)."""
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            _kill_all([int(pid_file.read_text())])
            return
        time.sleep(0.05)


def _die_leaving_a_forked_child(rank, pid_file):
    import multiprocessing
    if rank == 0:
        child = multiprocessing.get_context("fork").Process(target=_sleep_forever, args=(pid_file,))
        child.start()  # it inherits this rank's end of its result pipe
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_spawn_notices_a_dead_rank_whose_forked_child_holds_its_pipe(tmp_path):
    # spawn waited for the pipe's end, which the child held open: forever.
    pid_file = tmp_path / "child.pid"
    try:
        with pytest.raises(blsshm.RankFailedError, match="rank 0 ended without a result"):
            # 8 ranks: rank 0 is likely dead, and reaped by a later start(), before spawn waits
            blsshm.run_ranks(_die_leaving_a_forked_child, 8, args=(str(pid_file),), start_method="fork")
    finally:
        _kill_the_sleeper(pid_file)


def _return_leaving_a_forked_child(rank, pid_file):
    if rank == 0 and os.fork() == 0:  # the child holds this rank's exit sentinel, a pipe, open
        try:
            _sleep_forever(pid_file)
        finally:
            os._exit(0)
    return rank


def test_spawn_does_not_wait_for_what_a_rank_that_returned_left_running(tmp_path):
    # Their exits were awaited on multiprocessing's sentinel, which the child
    # held open: run_ranks returned only when the grace period (here longer
    # than the test's timeout) was over, 10 s late by default.
    pid_file = tmp_path / "child.pid"
    try:
        assert blsshm.run_ranks(_return_leaving_a_forked_child, 2, args=(str(pid_file),),
                                start_method="fork", grace=3600) == [0, 1]
    finally:
        _kill_the_sleeper(pid_file)


def _return_a_large_result(rank):
    return np.full(3 << 20, rank, np.uint8)  # many times a pipe's buffer


def test_large_results_come_back_whole_in_rank_order():
    results = blsshm.run_ranks(_return_a_large_result, 3)
    assert [r.shape for r in results] == [(3 << 20,)] * 3
    assert [int(r.min()) for r in results] == [0, 1, 2] and [int(r.max()) for r in results] == [0, 1, 2]


def _die_part_way_through_its_result(rank, pid_file):
    if rank == 0:
        import multiprocessing

        from blsshm import _spawn
        child = multiprocessing.get_context("fork").Process(target=_sleep_forever, args=(pid_file,))
        child.start()  # it inherits this rank's end of its result pipe

        def send_a_part_then_die(conn, payload):
            os.write(conn.fileno(), _spawn._REPORT_HEADER.pack(len(payload)) + payload[:1000])
            os.kill(os.getpid(), signal.SIGKILL)

        _spawn._send_report = send_a_part_then_die  # in this rank's process only
    return bytes(100_000)


def test_spawn_notices_a_rank_that_died_part_way_through_its_result(tmp_path):
    # The parent read the result until it had all of it: with the rest never
    # coming and a child of the rank holding the pipe open, forever.
    pid_file = tmp_path / "child.pid"
    try:
        with pytest.raises(blsshm.RankFailedError, match="rank 0 ended without a result .*SIGKILL"):
            blsshm.run_ranks(_die_part_way_through_its_result, 2, args=(str(pid_file),), start_method="fork")
    finally:
        _kill_the_sleeper(pid_file)


class _Pipe:
    """Just a descriptor, as a Connection gives ``_send_report``."""

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def _frame(value):
    import pickle

    from blsshm import _spawn
    payload = pickle.dumps(value)
    return _spawn._REPORT_HEADER.pack(len(payload)) + payload


def test_a_report_is_read_as_its_bytes_arrive_and_never_waited_for():
    from blsshm import _spawn
    r, w = os.pipe()
    try:
        report = _spawn._Report(r)
        assert report.read() is False  # nothing yet: returns, does not wait
        frame = _frame(("ok", 42))
        for part in (frame[:3], frame[3:-1]):  # part of the length, then all but the last byte
            os.write(w, part)
            assert report.read() is False
        os.write(w, frame[-1:])
        assert report.read() is True
        assert report.value() == ("ok", 42)
    finally:
        os.close(r)
        os.close(w)


def test_a_report_cut_short_by_the_end_of_its_pipe_is_an_eof():
    from blsshm import _spawn
    r, w = os.pipe()
    try:
        report = _spawn._Report(r)
        os.write(w, _frame(("ok", 42))[:-1])
        os.close(w)
        w = -1
        with pytest.raises(EOFError):
            report.read()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _return_its_rank(rank):
    return rank


def test_a_rank_seen_to_exit_before_its_report_is_seen_still_has_it_read(monkeypatch):
    # The parent's wait looks at the pipes, then at the exits: a rank could
    # write its report and exit in between, and only its exit show.  It had
    # returned: its report is in the pipe, and must not be taken for none.
    import multiprocessing.connection
    real_wait = multiprocessing.connection.wait

    def show_only_exits(handles, timeout=None):
        if not any(isinstance(h, int) for h in handles):
            return real_wait(handles, timeout)  # not the wait for the ranks' outcomes
        while True:
            ready = real_wait(handles, timeout)
            exits = [h for h in ready if isinstance(h, int)]  # pidfds (or sentinels); pipes are Connections
            if exits or not ready:
                return exits
            time.sleep(0.01)  # a report, but no exit yet: wait for one

    monkeypatch.setattr(multiprocessing.connection, "wait", show_only_exits)
    assert blsshm.run_ranks(_return_its_rank, 2) == [0, 1]


def _wait_for(path):
    for _ in range(400):
        if os.path.exists(path):
            return
        time.sleep(0.025)
    raise AssertionError(f"{path} never came")


def _fail_once_rank_0_is_stuck_in_its_report(rank, stuck_flag, get_stuck):
    if rank == 1:
        _wait_for(stuck_flag)
        raise ValueError("rank 1 failed")
    from blsshm import _spawn

    def report_then_get_stuck(conn, payload):
        get_stuck(conn, _spawn._REPORT_HEADER.pack(len(payload)) + payload, stuck_flag)

    _spawn._send_report = report_then_get_stuck  # in this rank's process only
    return bytes(100_000)


def _write_a_part_and_stop(conn, frame, stuck_flag):
    os.write(conn.fileno(), frame[:1000])
    open(stuck_flag, "w").close()
    os.kill(os.getpid(), signal.SIGSTOP)


def _close_the_pipe_and_run_on(conn, frame, stuck_flag):
    os.close(conn.fileno())
    open(stuck_flag, "w").close()
    time.sleep(1000)


@pytest.mark.parametrize("get_stuck", [_write_a_part_and_stop, _close_the_pipe_and_run_on])
def test_a_rank_stuck_in_its_report_holds_up_neither_another_failure_nor_the_grace_period(tmp_path, get_stuck):
    # The parent read a report to its end once it had begun, and waited for
    # the rank's exit once its pipe had ended: a rank stopped part-way, or
    # running on with its pipe closed, held it there for ever, another
    # rank's failure unheard.
    with pytest.raises(ValueError, match="rank 1 failed") as info:
        blsshm.run_ranks(_fail_once_rank_0_is_stuck_in_its_report, 2, args=(str(tmp_path / "stuck"), get_stuck),
                         start_method="fork", grace=0.5)
    assert info.value.blsshm_rank == 1


def test_a_rank_whose_parent_stopped_reading_ends_its_report_quietly():
    # The parent closes the pipes as it stops the ranks: a rank writing its
    # report then (its error after a Ctrl-C) waited out the grace period
    # with a large one, or died of BrokenPipeError with a traceback.
    from blsshm import _spawn
    r, w = os.pipe()
    os.close(r)
    handler = signal.getsignal(signal.SIGINT)
    try:
        _spawn._send_report(_Pipe(w), bytes(1 << 20))
        # A rank's last act: a Ctrl-C part-way would put its error in the middle.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
        os.close(w)


FORKSERVER_PARENT = r"""
import os, sys, time
import blsshm

def rank_main(comm, pid_dir):
    with open(os.path.join(pid_dir, str(comm.rank)), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1000)

if __name__ == "__main__":
    blsshm.spawn(rank_main, 2, args=(sys.argv[1],), start_method="forkserver")
"""


def test_forkserver_ranks_die_with_the_process_that_spawned_them(tmp_path):
    # Their parent is the fork server, which they kept alive: they ran on forever.
    path = tmp_path / "parent.py"
    path.write_text(FORKSERVER_PARENT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # The fork server's socket lives in a temporary directory its parent
    # removes at exit; killed, it cannot: put that directory in tmp_path.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    parent = subprocess.Popen([sys.executable, str(path), str(pid_dir)], env=env)
    pids = []
    try:
        while len(pids) < 2:
            assert parent.poll() is None
            time.sleep(0.05)
            pids = [int(p.read_text()) for p in pid_dir.iterdir() if p.read_text()]
        parent.kill()
        parent.wait()
        for _ in range(200):
            if not any(running(pid) for pid in pids):
                break
            time.sleep(0.05)
        assert not any(running(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        _kill_all(pids)


def _exchange(comm):
    counts = np.ones(comm.size, np.int64)
    return comm.alltoallv(np.full(comm.size, comm.rank, np.int32), counts)[0].tolist()


def _stop_the_fork_server(comm):
    _exchange(comm)  # every rank has been forked: the server may go
    if comm.rank == 0:
        server = os.getppid()
        os.kill(server, signal.SIGTERM)  # as a SIGTERM to the whole group would
        while os.getppid() == server:  # gone once we are reparented
            time.sleep(0.01)


def _stop_the_fork_server_then_exchange(comm):
    _stop_the_fork_server(comm)
    time.sleep(0.5)  # a parent-death signal armed against the server lands meanwhile
    return _exchange(comm)


def _fail_once_the_fork_server_is_gone(comm, pid_dir):
    _stop_the_fork_server(comm)
    _exchange(comm)  # after the server is gone
    if comm.rank == 1:
        raise ValueError("rank 1 fails")
    child = subprocess.Popen(["sleep", "60"])
    (pid_dir / "rank").write_text(str(os.getpid()))
    (pid_dir / "child").write_text(str(child.pid))
    time.sleep(60)


def test_forkserver_ranks_outlive_the_fork_server():
    # They were SIGKILLed with it (their parent-death signal was armed
    # against it), before the stop a SIGTERM to the group asks of them.
    try:
        assert blsshm.spawn(_stop_the_fork_server_then_exchange, 2, start_method="forkserver") == [[0, 1], [0, 1]]
    finally:
        multiprocessing.forkserver.ensure_running()  # reaps the dead server, starts another
    test_spawn_with_other_start_methods("forkserver")


def test_spawn_stops_forkserver_ranks_and_what_they_started_once_the_server_is_gone(tmp_path):
    # multiprocessing asks the fork server about its children: without it,
    # every rank looked dead, and spawn returned with rank 0 and its child
    # still running.
    try:
        with pytest.raises(ValueError, match="rank 1 fails"):
            blsshm.spawn(_fail_once_the_fork_server_is_gone, 2, args=(tmp_path,), grace=0.5,
                         start_method="forkserver")
        pids = [int((tmp_path / name).read_text()) for name in ("rank", "child")]
        deadline = time.monotonic() + 5  # SIGTERMed before spawn returned; a reaper may be slow
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(running(pid) for pid in pids)
    finally:  # whatever got as far as writing its pid, even if spawn did not raise as it should
        _kill_all([int(path.read_text()) for path in tmp_path.iterdir() if path.read_text()])
        multiprocessing.forkserver.ensure_running()  # reaps the dead server, starts another


def test_the_launcher_works_when_started_with_sigchld_ignored(tmp_path):
    # Ignored SIGCHLD makes the kernel reap the ranks itself.
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", str(path), "10"],
                         capture_output=True, text=True, timeout=50,
                         preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split("\n")[:-1]) == [f"rank {r} of 2 lag 0 done 10" for r in range(2)]


TAGGED = r"""
import os, sys
import numpy as np
import blsshm
with blsshm.init() as comm:
    lines = "".join(f"r{comm.rank} line {i} " + "x" * (i % 300) + "\n" for i in range(2000))
    for start in range(0, len(lines), 5000):  # pieces that end mid-line
        sys.stdout.write(lines[start:start + 5000])
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
    sys.stdout.write(f"r{comm.rank} no newline")
    if comm.rank == 1:
        raise RuntimeError("rank 1 fails")
"""


def test_tag_output_starts_every_line_with_its_rank(tmp_path):
    res = _launch(tmp_path, "-n", "3", "--tag-output", script=TAGGED)
    assert res.returncode == 1, res.stderr
    lines = res.stdout.split("\n")
    assert lines.pop() == ""
    for r in range(3):
        mine = [line for line in lines if line.startswith(f"[rank {r}] ")]
        # Whole, in order, each line once: no piece of another rank's line in between.
        assert mine == ([f"[rank {r}] r{r} line {i} " + "x" * (i % 300) for i in range(2000)]
                        + [f"[rank {r}] r{r} no newline"])
    assert len(lines) == 3 * 2001
    assert "[rank 1] RuntimeError: rank 1 fails" in res.stderr.split("\n")
    assert "[rank 1] Traceback (most recent call last):" in res.stderr.split("\n")
    assert res.stderr.rstrip("\n").endswith("python -m blsshm.run: rank 1 failed (exit code 1)")


ATTACH_AND_SAY = r"""
import blsshm
with blsshm.init() as comm:
    print("attached", comm.rank)
"""


@pytest.mark.parametrize("hard", [40, "raised"])
def test_tag_output_makes_room_for_its_pipes_or_says_why_not(tmp_path, hard):
    # Two pipe ends per rank: 16 ranks under a limit of 40 open files failed
    # part-way through the starts with a bare "OSError: Too many open files".
    path = tmp_path / "prog.py"
    path.write_text(ATTACH_AND_SAY)
    limit = (40, 40 if hard == 40 else resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "16", "--tag-output", str(path)],
                         capture_output=True, text=True, timeout=50,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit))
    if hard == 40:
        assert res.returncode == 2, res.stderr
        assert re.fullmatch(r"python -m blsshm.run: 16 ranks need about \d+ open files in this process, more than "
                            r"its limit of 40 \(hard limit 40\): raise it \(ulimit -n\) or leave out "
                            r"--tag-output\n", res.stderr), res.stderr
        assert res.stdout == ""
    else:
        assert res.returncode == 0, res.stderr
        assert sorted(res.stdout.split("\n")[:-1]) == sorted(f"[rank {r}] attached {r}" for r in range(16))


def test_tag_output_to_a_reader_that_stopped_reading(tmp_path):
    # `python -m blsshm.run --tag-output ... | head -1`: the ranks must not block on full pipes.
    path = tmp_path / "prog.py"
    path.write_text(TAGGED.replace("comm.rank == 1", "False"))
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert launcher.stdout.readline().startswith(b"[rank ")
        launcher.stdout.close()
        assert launcher.wait(timeout=40) == 0, launcher.stderr.read()
    finally:
        launcher.kill()  # the ranks die with it
        launcher.wait()


LONG_OUTPUT = r"""
import sys
import numpy as np
import blsshm
with blsshm.init() as comm:
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
    for i in range(int(sys.argv[1])):
        print(f"line {i} " + "x" * 100)
    print("A" * int(sys.argv[2]))
"""


def test_tag_output_with_the_launchers_stdout_closed_drops_the_output(tmp_path):
    # sys.stdout is None then: every relay died, and ranks that filled their pipe hung the run.
    path = tmp_path / "prog.py"
    path.write_text(LONG_OUTPUT)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path), "3000", "10"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=40,
                         preexec_fn=lambda: os.close(1))  # as `>&-`: the launcher starts without a stdout
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_tag_output_that_cannot_be_written_is_said_and_fails_the_run(tmp_path):
    # A full disk was taken for a reader gone: the output dropped, with status 0 and not a word.
    path = tmp_path / "prog.py"
    path.write_text(LONG_OUTPUT)
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path), "3000", "10"],
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=40)
    assert res.returncode == 120, res.stderr
    assert "cannot write the ranks' output to stdout" in res.stderr and "No space left" in res.stderr


def test_tag_output_waits_for_room_on_a_non_blocking_stdout(tmp_path):
    # A parent (a CI runner, node) may hand over a non-blocking pipe: EAGAIN dropped the rest, status 0.
    path = tmp_path / "prog.py"
    path.write_text(LONG_OUTPUT)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path), "3000",
                                 "10"], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with open(read_end, "rb") as reader:
            time.sleep(1)  # let the pipe fill
            lines = reader.read().split(b"\n")
        assert launcher.wait(timeout=40) == 0, launcher.stderr.read()
        assert len(lines) == 2 * 3001 + 1
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stderr.close()


def test_tag_output_passes_a_long_line_whole(tmp_path):
    # Lines over 64 KiB were cut, a newline and a prefix put in the middle (a long JSON line broken).
    path = tmp_path / "prog.py"
    path.write_text(LONG_OUTPUT)
    res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "1", "--tag-output", str(path), "0", "200000"],
                         capture_output=True, text=True, timeout=40)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "[rank 0] " + "A" * 200000 + "\n"


ESCAPES = r"""
import subprocess, sys
import numpy as np
import blsshm
with blsshm.init() as comm:
    comm.alltoallv(np.zeros(comm.size), [1] * comm.size)
    if comm.rank == 0:  # left the rank's group, keeps the rank's stdout open
        child = subprocess.Popen(["setsid", "sleep", "1000"])
        with open(sys.argv[1], "w") as f:
            f.write(str(child.pid))
    print(f"rank {comm.rank} done")
"""


def test_tag_output_does_not_wait_for_a_process_that_left_its_rank(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(ESCAPES)
    pid_file = tmp_path / "child.pid"
    try:
        res = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path),
                              str(pid_file)], capture_output=True, text=True, timeout=40)
        assert res.returncode == 0, res.stderr
        assert sorted(res.stdout.split("\n")[:-1]) == ["[rank 0] rank 0 done", "[rank 1] rank 1 done"]
    finally:
        if pid_file.exists():
            _kill_all([int(pid_file.read_text())])


class _NotebookStream(__import__("io").StringIO):
    """Like ipykernel's OutStream: text only, yet fileno() names the kernel's own terminal."""

    def __init__(self, terminal_fd):
        super().__init__()
        self.terminal_fd = terminal_fd

    def fileno(self):
        return self.terminal_fd  # what goes there never reaches the cell


@pytest.mark.parametrize("stream", ["StringIO", "notebook"])
def test_tag_output_into_a_text_only_stream(tmp_path, monkeypatch, stream):
    # main() called in a process whose sys.stdout has no binary buffer (a notebook, a test's capture).
    import io
    from blsshm import run
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    terminal = os.open(os.devnull, os.O_WRONLY)
    out, err = (io.StringIO() if stream == "StringIO" else _NotebookStream(terminal)), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    try:
        assert run.main(["-n", "2", "--tag-output", str(path), "5"]) == 0, err.getvalue()
    finally:
        os.close(terminal)
    assert sorted(out.getvalue().split("\n")[:-1]) == [f"[rank {r}] rank {r} of 2 lag 0 done 5" for r in range(2)]


CTRL_C_AT_START_UP = r"""
import os, signal, sys, time
import blsshm

class Slow:  # unpickled in each new rank, before it reaches blsshm's code
    def __reduce__(self):
        return (slow_start, (sys.argv[1],))

def slow_start(flag_dir):
    open(os.path.join(flag_dir, str(os.getpid())), "w").close()
    time.sleep(5)

def rank_main(comm, _slow):
    return comm.rank

def unhurried(signum, frame):  # gives the ranks time to show what Ctrl-C does to them
    time.sleep(1)
    raise KeyboardInterrupt

if __name__ == "__main__":
    signal.signal(signal.SIGINT, unhurried)
    try:
        blsshm.spawn(rank_main, 2, args=(Slow(),), start_method="spawn")
    except BaseException as exc:
        print(type(exc).__name__, getattr(exc, "blsshm_rank", "here"), flush=True)
"""


@pytest.mark.timeout(60)
def test_ctrl_c_while_ranks_start_up_stops_them_without_tracebacks(tmp_path):
    # A terminal's Ctrl-C reaches the whole process group: ranks still
    # starting up (unpickling, importing) printed KeyboardInterrupt tracebacks.
    # Now they leave it to the parent, which stops them.
    path = tmp_path / "ctrl_c.py"
    path.write_text(CTRL_C_AT_START_UP)
    flags = tmp_path / "flags"
    flags.mkdir()
    proc = subprocess.Popen([sys.executable, str(path), str(flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while len(os.listdir(flags)) < 2 and proc.poll() is None:  # both ranks are starting up
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (out, err) == ("KeyboardInterrupt here\n", "")


BUSY_WHEN_ONE_FAILS = r"""
import os, sys, time
import blsshm
comm = blsshm.init()
printed = os.path.join(os.path.dirname(__file__), "printed")
if comm.rank == 1:
    while not os.path.exists(printed):  # rank 0's print comes first
        time.sleep(0.01)
    sys.exit(3)
print(f"rank {comm.rank}: epoch 1 done")  # not flushed by the program: stdout is a pipe
open(printed, "w").close()
time.sleep(60)  # busy, in no collective: it never hears of rank 1
"""


def _launch_buffered(tmp_path, script, *args):
    """Run ``script`` as the launcher's target with Python's default buffering (this sandbox may unset it)."""
    path = tmp_path / "prog.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-m", "blsshm.run", *args, str(path)],
                          capture_output=True, text=True, timeout=50, env=env)


def test_the_status_is_the_failing_ranks_not_that_of_one_the_launcher_stopped(tmp_path):
    # Rank 0, stopped with SIGTERM after the grace period, was reported as the
    # failure (status 143) for being the lowest rank that failed.
    res = _launch_buffered(tmp_path, BUSY_WHEN_ONE_FAILS, "-n", "2", "--grace", "0.3")
    assert res.returncode == 3, res.stderr
    first = res.stderr.index("rank 1 failed (exit code 3)")
    assert res.stderr.index("rank 0 failed (signal SIGTERM, from the launcher after the grace period)") > first


def test_what_a_rank_printed_survives_its_being_stopped(tmp_path):
    # Its Python buffered stdout (a pipe), and died of the SIGTERM with the line unwritten.
    res = _launch_buffered(tmp_path, BUSY_WHEN_ONE_FAILS, "-n", "2", "--grace", "0.3")
    assert res.stdout == "rank 0: epoch 1 done\n", res.stderr


MANY_LINES = r"""
import sys
import blsshm
with blsshm.init() as comm:
    for i in range(int(sys.argv[1])):
        print(f"line {i} of rank {comm.rank} " + "x" * 40)
"""


def test_tagged_output_waits_for_a_slow_reader(tmp_path):
    # Lines still on their way when the ranks ended were dropped after 2 s, though the reader lived.
    path = tmp_path / "prog.py"
    path.write_text(MANY_LINES)
    n = 1500  # about 100 KB: it fits the pipes, so the rank ends before anything is read
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "1", "--tag-output", str(path),
                                 str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2 * RELAY_DRAIN_S)  # a reader at the pace of `| less`
        out, err = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
        launcher.wait()
    lines = out.decode().splitlines()
    assert len(lines) == n and lines[-1].startswith(f"[rank 0] line {n - 1} of rank 0"), err
    assert launcher.returncode == 0


STOPPABLE = r"""
import os, time
import blsshm
with blsshm.init() as comm:
    os.write(1, f"{os.getpid()}\n".encode())
    while not os.path.exists("done"):
        time.sleep(0.02)
"""


@contextlib.contextmanager
def _job(tmp_path, argv, **popen):
    """The launcher started as a shell starts a job: a group of its own in our
    session (not orphaned, so SIGTSTP stops it); killed and reaped at the end."""
    launcher = subprocess.Popen(argv, cwd=tmp_path, process_group=0, **popen)
    try:
        yield launcher
    finally:
        launcher.kill()
        launcher.wait()


def _finish(tmp_path, launcher):
    """Let ranks running STOPPABLE end (they wait for a file); the launcher's status."""
    (tmp_path / "done").touch()
    return launcher.wait(timeout=30)


def _until_stopped(launcher):
    """Wait until ``launcher`` (our child) is stopped (Ctrl-Z)."""
    _until(lambda: os.waitid(os.P_PID, launcher.pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT) is not None,
           "the launcher did not stop")


def _until(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_ctrl_z_stops_the_ranks_with_the_launcher_and_fg_continues_them(tmp_path):
    # Ctrl-Z stopped the launcher alone (each rank leads a group of its own):
    # the ranks ran on unsupervised while the shell said "Stopped".
    path = tmp_path / "prog.py"
    path.write_text(STOPPABLE)
    with _job(tmp_path, [sys.executable, "-m", "blsshm.run", "-n", "2", str(path)],
              stdout=subprocess.PIPE, text=True) as launcher:
        pids = [int(launcher.stdout.readline()) for _ in range(2)]
        os.kill(launcher.pid, signal.SIGTSTP)  # what the terminal sends on Ctrl-Z
        _until_stopped(launcher)
        # Signals are delivered when their target next runs: on a loaded machine, later.
        _until(lambda: all(process_state(pid) == "T" for pid in pids), "the ranks were not stopped")
        os.kill(launcher.pid, signal.SIGCONT)  # fg
        _until(lambda: all(process_state(pid) != "T" for pid in pids), "the ranks were not continued")
        assert _finish(tmp_path, launcher) == 0


ESCAPED_WRITER = r"""
import os, subprocess
import blsshm
with blsshm.init() as comm:
    if comm.rank == 0:  # a process that leaves the rank's group, and keeps writing to its stdout
        writer = subprocess.Popen(["yes", "escaped output line"], start_new_session=True)
        with open("writer.pid", "w") as f:
            f.write(str(writer.pid))
"""


def test_tagged_output_of_a_process_that_left_its_rank_does_not_hold_the_launcher(tmp_path):
    # Only time spent waiting in read counted against the 2 s for such a
    # pipe: with a writer that never stops, reads never wait, and the
    # launcher ran on for minutes (deaf to Ctrl-C) after its ranks had ended.
    path = tmp_path / "prog.py"
    path.write_text(ESCAPED_WRITER)
    launcher = subprocess.Popen([sys.executable, "-m", "blsshm.run", "-n", "2", "--tag-output", str(path)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = launcher.communicate(timeout=30)  # a bound on a hang, not a speed
    finally:
        launcher.kill()
        launcher.wait()
        _until(lambda: (tmp_path / "writer.pid").exists(), "rank 0 did not start its writer")
        os.kill(int((tmp_path / "writer.pid").read_text()), signal.SIGKILL)
    assert launcher.returncode == 0, err
    assert out.startswith(b"[rank 0] escaped output line\n")


FAILS_ON_CUE = r"""
import os, sys, time
import blsshm
with blsshm.init() as comm:
    os.write(1, f"{comm.rank} {os.getpid()}\n".encode())
    cue = "fail" if comm.rank == 1 else "done"
    while not os.path.exists(cue):
        time.sleep(0.01)
    if comm.rank == 1:
        sys.exit(1)
"""


def test_time_stopped_by_ctrl_z_does_not_count_against_the_grace_period(tmp_path):
    # The grace period ran on while the run was stopped: on fg, rank 0 got
    # SIGTERM at once, with most of its grace unused.
    path = tmp_path / "prog.py"
    path.write_text(FAILS_ON_CUE)
    with _job(tmp_path, [sys.executable, "-m", "blsshm.run", "-n", "2", "--grace", "3", str(path)],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launcher:
        pids = dict(tuple(map(int, launcher.stdout.readline().split())) for _ in range(2))
        (tmp_path / "fail").touch()
        _until(lambda: process_state(pids[1]) in ("Z", None), "rank 1 did not exit")
        time.sleep(0.3)  # the launcher sees the failure: its grace period runs
        os.kill(launcher.pid, signal.SIGTSTP)
        _until_stopped(launcher)
        time.sleep(4)  # longer than the grace period, all of it stopped
        os.kill(launcher.pid, signal.SIGCONT)
        _until(lambda: process_state(pids[0]) != "T", "rank 0 was not continued")
        (tmp_path / "done").touch()  # rank 0 ends well within what is left of its grace
        _, err = launcher.communicate(timeout=30)
    assert "SIGTERM" not in err, err
    assert "rank 1 failed (exit code 1)" in err and "rank 0" not in err, err
    assert launcher.returncode == 1


CTRL_Z_WHILE_A_RANK_STARTS = r"""
import os, signal, subprocess, sys
from blsshm import run
real_popen = subprocess.Popen
ranks_started = []

def popen(*args, **kwargs):
    if kwargs.get("preexec_fn"):  # a rank (the segment's reaper starts without)
        ranks_started.append(1)
        if len(ranks_started) == 2:
            os.kill(os.getpid(), signal.SIGTSTP)  # Ctrl-Z while the second rank starts
    return real_popen(*args, **kwargs)

subprocess.Popen = popen
sys.exit(run.main(sys.argv[1:]))
"""


def _children_running(parent, script):
    """Pids of ``parent``'s children whose command line names ``script``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == parent and script.encode() in cmdline:
                pids.append(int(entry))
    return pids


def test_ctrl_z_while_a_rank_starts_stops_that_rank_too(tmp_path):
    # The handler ran inside Popen, before the new rank was listed: it was
    # never stopped, and ran on alone.
    (tmp_path / "prog.py").write_text(STOPPABLE)
    (tmp_path / "launch.py").write_text(CTRL_Z_WHILE_A_RANK_STARTS)
    with _job(tmp_path, [sys.executable, "launch.py", "-n", "3", "prog.py"],
              stdout=subprocess.DEVNULL) as launcher:
        _until_stopped(launcher)
        ranks = _children_running(launcher.pid, "prog.py")
        assert len(ranks) == 2, ranks  # the third is started once it is continued
        _until(lambda: all(process_state(pid) == "T" for pid in ranks), "a rank started with Ctrl-Z was not stopped")
        os.kill(launcher.pid, signal.SIGCONT)
        _until(lambda: len(_children_running(launcher.pid, "prog.py")) == 3, "the third rank did not start")
        assert _finish(tmp_path, launcher) == 0


SHOWS_BUFFERING = r"""
import os
import blsshm
with blsshm.init() as comm:
    print(comm.rank, os.environ.get("PYTHONUNBUFFERED"))
"""


@pytest.mark.parametrize("stdout", ["pipe", "terminal"])
def test_ranks_write_unbuffered_except_to_a_terminal(tmp_path, stdout):
    # Unbuffered on a terminal, a print's pieces from several ranks could
    # interleave mid-line; line-buffered there, nothing printed is lost anyway.
    import pty
    path = tmp_path / "prog.py"
    path.write_text(SHOWS_BUFFERING)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    reader, writer = os.pipe() if stdout == "pipe" else pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "blsshm.run", "-n", "1", str(path)], stdout=writer,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=50)
        os.close(writer)
        writer = -1
        out = os.read(reader, 4096).decode().replace("\r\n", "\n")
    finally:
        os.close(reader)
        if writer >= 0:
            os.close(writer)
    assert proc.returncode == 0, proc.stderr
    assert out == ("0 1\n" if stdout == "pipe" else "0 None\n")


MANY_RANKS = r"""
import resource, sys
import blsshm

def rank_main(rank):
    return rank

if __name__ == "__main__":
    try:
        print(blsshm.run_ranks(rank_main, 30) == list(range(30)), flush=True)
    except blsshm.BlsValueError as exc:
        print(f"BlsValueError: {exc}", flush=True)
"""


@pytest.mark.parametrize("hard", [4096, 80])
def test_many_ranks_under_a_low_open_files_limit(tmp_path, hard):
    """30 ranks need about 130 descriptors in the parent: a soft limit of 64 is raised when the hard
    one allows it, else a clear error names the limit (it was a bare OSError halfway through the starts)."""
    path = tmp_path / "many.py"
    path.write_text(MANY_RANKS)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60,
                         preexec_fn=low_limit).stdout
    if hard == 4096:
        assert out == "True\n"
    else:
        assert out.startswith("BlsValueError: 30 ranks need about") and "limit of 64 (hard limit 80)" in out \
            and "ulimit -n" in out, out
