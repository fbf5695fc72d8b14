"""tools/: the figures they compute from measured times, and bad arguments refused before any run."""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import blsshm

pytestmark = pytest.mark.timeout(60)

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_oversubscribed_memcpy_floor_is_the_copying_spread_over_the_cores():
    # Each rank timed a barrier after its copy: the floor held the barrier's
    # exit and a switch (57 us at P = 4, 64 B, above the transports it bounds).
    compare = _tool("compare_alltoallv")
    ns = np.array([[100, 100], [100, 400], [100, 100], [100, 100]])  # ns[rank, iteration]
    assert compare.floor_series(ns, 2).tolist() == [200.0, 400.0]  # sum / cores, at least the longest
    rank_opts = {"cores": 2}
    # The clock's own cost (CPU time is a system call) is not copying: summed
    # over 4 ranks on 2 cores it would count twice per iteration.
    ticks = iter(range(0, 1 << 40, 50))
    clock = lambda: next(ticks)  # noqa: E731  (every read costs 50 ns)
    timed = ns + 50
    rounds = [[{64: compare.floor_entry(timed[r], 4, rank_opts, clock)} for r in range(4)] for _ in range(2)]
    fig = compare.summarize(compare.merge_rounds(rounds), 64)
    assert fig["floor_of_shared_cores"] == 2 and fig["iters"] == 4
    assert fig["median_us"] == pytest.approx(0.3) and fig["loop_us"] == pytest.approx(0.3)
    # Not oversubscribed: every rank copies at once, the slowest ends the iteration.
    alone = [{64: compare.floor_entry(timed[r], 4, {"cores": 4}, clock)} for r in range(4)]
    assert "shared_cores" not in alone[0][64]
    assert compare.summarize(alone, 64)["max_us"] == pytest.approx(0.4)


@pytest.mark.parametrize("tool, argv, message", [
    ("compare_alltoallv", ["--timeout", "0"], "--timeout must be a positive number of seconds"),
    ("compare_alltoallv", ["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    ("compare_alltoallv", ["--timeout", "inf"], "--timeout must be a positive number of seconds"),
    ("compare_alltoallv", ["--json", "/nonexistent-dir/x.json"], "cannot write in /nonexistent-dir"),
    ("switch_cost", ["--rounds", "0"], "--rounds must be at least 1"),
    ("spin_policy", ["--spins", "nan"], "--spins: spin_us must be a number of microseconds"),
    ("spin_policy", ["--spins", "-5"], "--spins: spin_us must be a number of microseconds"),
    ("dlrm_report", ["--repeat", "0"], "--repeat must be at least 1"),
    ("compare_alltoallv", ["--warmup", "0"], "--warmup must be positive"),  # MPI's first call connects
    ("compare_alltoallv", ["--json", "{tmp}"], "--json {tmp}: not a file this can write"),  # was after the run
    ("dlrm_report", ["--lag", "-1"], "--lag must be at least 1"),
    ("dlrm_report", ["--lag", "0"], "--lag must be at least 1 (it is compared with lag 0)"),  # lag0/lag0
    ("dlrm_report", ["--json", "{tmp}"], "--json {tmp}: a directory, not a file"),
    ("dlrm_report", ["--nprocs", "0"], "--nprocs at least 1"),
    ("single_copy", ["--rounds", "0"], "--rounds must be at least 1"),
    ("single_copy", ["--size", "0"], "--size: size must be positive"),
    ("single_copy", ["--size", "3072M"], "--size must be at most 2147479552 bytes"),
])
def test_the_tools_refuse_bad_arguments_before_running(tmp_path, tool, argv, message):
    # They ran and failed late (every backend "timed out", a traceback after
    # the whole run, a negative time), or printed "(no figures)" with status 0.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    res = subprocess.run([sys.executable, os.path.join(TOOLS, f"{tool}.py"), *argv],
                         capture_output=True, text=True, timeout=50)
    assert res.returncode == 2 and message.replace("{tmp}", str(tmp_path)) in res.stderr, res.stderr


def test_ratios_show_three_significant_figures():
    # bls/gloo (about 0.005 at 64 B) read 0.00.
    compare = _tool("compare_alltoallv")
    assert [compare.fmt_ratio(v) for v in (0.00468, 0.3, 1.354, 12.36, 123.4, 999.6, 12345.6, None)] == [
        "0.00468", "0.300", "1.35", "12.4", "123", "1000", "12346", "-"]


def test_every_backend_gets_the_same_untimed_calls():
    # blsshm got warmup + 1, the others warmup (and --warmup 0 was taken):
    # MPI's first timed call set up its connections and blsshm's did not.
    compare = _tool("compare_alltoallv")
    calls = []
    compare.blsshm_timed(type("C", (), {"reset_stats": lambda self: None, "stats": {}})(),
                         lambda: calls.append(1), 3, 0)
    assert len(calls) == 3


def test_the_result_check_catches_a_transport_that_skips_or_repeats_an_iteration():
    # The timed calls all send the same bytes and only the last was checked:
    # a transport that wrote out once, or delivered an earlier iteration's
    # slot, passed.  (One rank, sending to itself.)
    compare = _tool("compare_alltoallv")
    size = 8
    send = compare.send_buffer(0, 1, size)
    recv = np.empty(size, np.uint8)
    earlier = [send.copy()]
    calls = []

    def exact():
        np.copyto(recv, send)

    def one_late():  # a slot of the iteration before
        np.copyto(recv, earlier[-1])
        earlier.append(send.copy())

    def once():  # wrote out on the first call only
        if not calls:
            exact()
        calls.append(1)

    for transport in (exact, once, one_late):
        for _ in range(3):  # the timed calls: each right so far
            transport()
        compare.check_received(recv, 0, 1, size)
    compare.check_fresh_calls(exact, send, recv, 0, 1, size)
    for wrong in (one_late, once):
        with pytest.raises(RuntimeError, match="wrong bytes from rank 0"):
            compare.check_fresh_calls(wrong, send, recv, 0, 1, size)


def test_compare_runs_each_number_of_ranks_once():
    # --nprocs 2 2 ran P = 2 twice, and the JSON (keyed by P) kept the second run only.
    opts = _tool("compare_alltoallv").parse_args(["--nprocs", "4", "2", "2", "--sizes", "4K", "4096"])
    assert opts.nprocs == [2, 4] and opts.sizes == [4096]


@pytest.mark.parametrize("says, btl", [("mpirun (Open MPI) 5.0.11", "self,sm"),
                                       ("mpirun (Open MPI) 4.1.6", "self,vader"),
                                       ("mpirun (Open MPI) 3.1.6", "self,vader"),
                                       ("HYDRA build details:\n    Version: 4.2.0", None)])
def test_mpirun_gets_the_options_of_its_own_mpi(tmp_path, says, btl):
    """Open MPI below 5 calls its shared-memory transport vader ("sm" names a removed one);
    MPICH takes none of Open MPI's options."""
    from blsshm import _proc
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(f"#!/bin/sh\necho '{says}'\n")
    mpirun.chmod(0o755)
    options = _proc.mpirun_options(str(mpirun))
    if btl is None:
        assert options == ["-bind-to", "none"]
    else:
        assert options[:3] == ["--mca", "btl", btl] and "--oversubscribe" in options
        assert "--oversubscribe" not in _proc.mpirun_options(str(mpirun), oversubscribe=False)


@pytest.fixture
def restores_termination_handlers():
    """dlrm_report's main installs its own SIGTERM and SIGHUP handlers: not for the rest of the tests."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_the_report_keeps_each_run_as_it_ends_once_per_configuration_in_aligned_columns(
        tmp_path, monkeypatch, capsys, restores_termination_handlers):
    # The JSON was written only at the very end (a stopped matrix kept
    # nothing), --nprocs 2 2 ran everything twice, and headers longer than
    # the 10-wide cells put every value under the wrong one.
    report = _tool("dlrm_report")
    path = str(tmp_path / "r.json")
    seen = []

    def run_one(model, nprocs, delays, opts, round_):
        if seen:  # the runs before this one are on disk already
            with open(path) as f:
                assert len(json.load(f)) == len(seen)
        seen.append((model, nprocs, delays))
        return {"runs": []}

    monkeypatch.setattr(report, "run_one", run_one)
    monkeypatch.setattr(report, "ratios", lambda doc, lag: {key: 12.345 for key in KEYS})
    KEYS = ["lagL_over_lag0", "lagL_over_gloo", "lagL_over_mpi", "wall_over_ideal", "wall_over_replay",
            "replay_over_ideal", "wall_over_best_bound", "lag0_wall_over_ideal", "room_sync_over_ideal"]
    report.main(["--models", "light", "light", "--nprocs", "2", "2", "--json", path])
    assert seen == [("light", 2, d) for d in report.DELAYS]
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if line.startswith("model"))
    row = next(line for line in out if line.startswith("light"))
    assert len(row) == len(header)
    for name in ("lag4/lag0", "lag0 wall/ideal", "sync/ideal"):  # each value ends under its header
        end = header.index(name) + len(name)
        assert row[end - 5:end] == "12.35"


def test_each_round_of_the_report_runs_the_backends_in_its_own_order(monkeypatch, restores_termination_handlers):
    # Every --repeat round ran bls lag 0, lag L, gloo and MPI in that order,
    # so a backend's place (the first after the data is made; right after
    # the same one) was the same in every round.
    report = _tool("dlrm_report")
    run_one = report.run_one
    rounds = []
    monkeypatch.setattr(report, "run_one", lambda model, nprocs, delays, opts, round_: rounds.append(round_))
    report.main(["--models", "light", "--nprocs", "2", "--repeat", "3"])
    assert rounds == [k for k in range(3) for _ in report.DELAYS]
    commands = []

    class Exited:  # the run dlrm_report starts: it ends at once, writing nothing
        returncode = 0

        def __init__(self, cmd, **_):
            commands.append(cmd)

        def communicate(self):
            return "", ""

        def poll(self):
            return 0

    monkeypatch.setattr(report.subprocess, "Popen", Exited)
    opts = report.main.__globals__["argparse"].Namespace(lag=4, num_batches={"light": 10})
    assert run_one("light", 2, "none", opts, 2) is None
    cmd = commands[0]
    assert cmd[cmd.index("--order-offset") + 1] == "2" and "--compare" in cmd


def test_switch_cost_times_turns_only_once_the_partner_is_ready(monkeypatch):
    # The two processes on the core began their timed loops unsynchronized:
    # the partner's set-up (a communicator: milliseconds) ran inside the
    # first turns, and a partner that failed left every turn yielding to
    # nobody, printed as a cheap switch.
    switch_cost = _tool("switch_cost")
    hot, turn = switch_cost.measure("alltoallv", 200)
    assert 0 < hot < turn
    parent, make_call = os.getpid(), switch_cost.make_call

    def make_call_failing_in_the_partner(kind):
        if os.getpid() != parent:
            raise RuntimeError("the partner cannot make its call")
        return make_call(kind)

    monkeypatch.setattr(switch_cost, "make_call", make_call_failing_in_the_partner)
    with pytest.raises(RuntimeError, match="the partner process for 'none' failed before its first turn"):
        switch_cost.measure("none", 200)


@pytest.fixture
def forked(monkeypatch):
    """The pids of the processes ``os.fork`` starts in the test; any still there at its end killed and reaped."""
    pids, real_fork = [], os.fork

    def fork_noting_the_child():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork_noting_the_child)
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_switch_cost_reaps_its_partner_when_the_timing_side_fails(monkeypatch, forked):
    # The timing side's own call failing (after the fork) left the partner
    # taking turns at full speed, unreaped, for as long as anything lived.
    switch_cost = _tool("switch_cost")
    parent, make_call, made = os.getpid(), switch_cost.make_call, []

    def make_call_failing_in_the_timing_side(kind):
        if os.getpid() == parent:
            made.append(kind)
            if len(made) == 2:  # the first was the hot loop's, before the fork
                raise OSError("the timing side cannot make its call")
        return make_call(kind)

    monkeypatch.setattr(switch_cost, "make_call", make_call_failing_in_the_timing_side)
    with pytest.raises(OSError, match="the timing side cannot make its call"):
        switch_cost.measure("none", 200)
    assert len(forked) == 1
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(forked[0], os.WNOHANG)


def test_single_copy_reads_the_senders_bytes_and_reaps_the_sender_after_a_failed_read(monkeypatch, forked):
    single_copy = _tool("single_copy")
    cma, memcpy = single_copy.measure(4096, 20)  # checks the bytes it read are the sender's
    assert cma > 0 and memcpy > 0 and len(forked) == 1

    def failing_reader(pid, local, remote_address):
        def read():
            raise OSError("cannot read the sender")
        return read

    monkeypatch.setattr(single_copy, "_reader", failing_reader)
    with pytest.raises(OSError, match="cannot read the sender"):
        single_copy.measure(4096, 20)
    assert len(forked) == 2
    for pid in forked:
        with pytest.raises(ChildProcessError):  # reaped, after the run as after the failure
            os.waitpid(pid, os.WNOHANG)


def test_single_copy_reads_a_sender_on_huge_pages(forked):
    single_copy = _tool("single_copy")
    cma, memcpy = single_copy.measure(2 << 20, 5, blsshm.empty)  # checks the bytes it read
    assert cma > 0 and memcpy > 0 and len(forked) == 1


def test_send_buffers_on_huge_pages_hold_the_same_blocks():
    compare = _tool("compare_alltoallv")
    size = 1 << 19
    assert np.array_equal(compare.send_buffer(1, 4, size, salt=2, huge_pages=True),
                          compare.send_buffer(1, 4, size, salt=2))


def _saved_run(lag, gloo):
    fig = {"samples_per_s": 100.0, "wall_over_ideal": 1.5, "wall_s": 3.0, "lag_bound_s": 2.0,
           "wall_over_replay": 1.2, "replay_s": 2.5, "ideal_bound_s": 2.0, "wall_over_best_bound": 1.5,
           "sync_bound_s": 2.4}
    runs = [{"label": "bls lag 0", **fig, "samples_per_s": 50.0}, {"label": f"bls lag {lag}", **fig}]
    if gloo is not None:
        runs.append({"label": "gloo", **fig, "samples_per_s": gloo})
    return {"config": {"lag": lag}, "runs": runs}


def test_the_report_tabulates_saved_runs_and_says_what_each_cell_is(tmp_path, capsys):
    # Saved runs could not be tabulated again without running the matrix;
    # with --repeat the cells had no legend, a round without a figure went
    # unsaid, and lag L's own columns did not say they were its.
    report = _tool("dlrm_report")
    docs = [{"model": "light", "nprocs": 2, "delays": "none", "round": r, "ratios": None,
             "run": _saved_run(3, gloo)} for r, gloo in enumerate([20.0, None, 50.0])]
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(docs))
    assert report.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "each cell: the median over the 3 rounds (lowest-highest); n=k: only k rounds gave it" in out
    header = next(line for line in out.splitlines() if line.startswith("model"))
    assert "lag3/lag0" in header and "lag3 wall/ideal" in header and "lag0 wall/ideal" in header
    row = next(line for line in out.splitlines() if line.startswith("light"))
    assert "2.00 (2.00-2.00)" in row and "3.50 (2.00-5.00) n=2" in row  # lag3/lag0; lag3/gloo in 2 of 3
    # A configuration whose every run failed is saved without figures, and said so.
    failed = [{"model": "light", "nprocs": 4, "delays": "none", "round": 0, "lag": 3, "ratios": None, "run": None}]
    path.write_text(json.dumps(docs + failed))
    assert report.main(["--from-json", str(path)]) == 1
    assert "light     4 none     (no figures)" in capsys.readouterr().out
    path.write_text(json.dumps(docs + [{**docs[0], "run": _saved_run(4, None)}]))
    assert report.main(["--from-json", str(path)]) == 2
    assert "runs of 2 lags ([3, 4]): one table takes one" in capsys.readouterr().err
    path.write_text(json.dumps([{**docs[0], "run": {"config": {"lag": 3}, "runs": [{"label": "bls lag 3"}, {"label": "bls lag 0"}]}}]))
    assert report.main(["--from-json", str(path)]) == 2  # a figure missing: said, no traceback
    assert "cannot read" in capsys.readouterr().err
