"""dlrm_bench's pieces on their own: lookup kernel, data generators, placement."""
import warnings

import numpy as np
import pytest

from dlrm_bench._pooling import pool_sum
from dlrm_bench.cli import compute_drift_notes, median_round, paired_ratios, round_order
from dlrm_bench.config import parse
from dlrm_bench.data import expected_pooling, load_rank_data, make_bags
from dlrm_bench.sharding import make_plan, place_tables, split_batch


def _cfg(*flags):
    return parse(["--arch-sparse-feature-size", "4", "--arch-mlp-bot", "3-4", *flags])[0]


def test_pool_sum_matches_numpy_and_writes_only_its_columns():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    sizes = np.array([3, 0, 1, 7, 2])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    indices = rng.integers(0, 50, offsets[-1]).astype(np.int64)
    out = np.full((3, 24), 7.0, dtype=np.float32)
    pool_sum(table, indices, offsets, 2, out, 8)  # bags 2, 3, 4 into columns 8..15
    for row, bag in enumerate(range(2, 5)):
        expected = np.zeros(8, np.float32)
        for i in indices[offsets[bag]:offsets[bag + 1]]:
            expected += table[i]  # same order, float32: bit for bit
        assert np.array_equal(out[row, 8:16], expected)
    assert (out[:, :8] == 7).all() and (out[:, 16:] == 7).all()


def test_pool_sum_rejects_bad_indices_offsets_and_shapes():
    table = np.ones((5, 2), np.float32)
    out = np.zeros((1, 2), np.float32)
    with pytest.raises(IndexError, match="index 5 at position 1 is outside a table of 5 rows"):
        pool_sum(table, np.array([0, 5], np.int64), np.array([0, 2], np.int64), 0, out, 0)
    with pytest.raises(IndexError, match="outside a table"):
        pool_sum(table, np.array([-1], np.int64), np.array([0, 1], np.int64), 0, out, 0)
    with pytest.raises(IndexError, match="offsets 0..3 outside 2 indices"):
        pool_sum(table, np.array([0, 1], np.int64), np.array([0, 3], np.int64), 0, out, 0)
    with pytest.raises(IndexError, match="not all in offsets"):
        pool_sum(table, np.array([0], np.int64), np.array([0, 1], np.int64), 1, out, 0)
    with pytest.raises(IndexError, match="do not fit"):
        pool_sum(table, np.array([0], np.int64), np.array([0, 1], np.int64), 0, out, 1)


def test_random_bags_follow_the_reference_pooling_rule():
    cfg = _cfg("--arch-embedding-size", "1000-3", "--num-indices-per-lookup", "6", "--mini-batch-size", "400")
    bags = make_bags(cfg, 0, 5)
    sizes = bags.sizes
    assert len(bags.offsets) == 401 and sizes.min() >= 1 and sizes.max() <= 6
    assert len(set(sizes.tolist())) > 3  # sizes vary: uniform in 1..K
    for b in range(400):
        rows = bags.indices[bags.offsets[b]:bags.offsets[b + 1]]
        assert np.array_equal(rows, np.unique(rows))  # sorted, no duplicates
        assert rows.min() >= 0 and rows.max() < 1000
    small = make_bags(cfg, 1, 5)  # 3 rows: bag size capped by the table
    assert small.sizes.max() <= 3 and small.indices.max() <= 2
    fixed = make_bags(cfg.replace(indices_per_lookup_fixed=True), 0, 5)
    assert fixed.sizes.max() == 6 and fixed.sizes.min() >= 4  # K drawn, duplicates removed
    # K = 6 draws from 3 rows leave 2.74 distinct rows on average (3 draws would leave 2.11)
    assert make_bags(cfg.replace(indices_per_lookup_fixed=True), 1, 5).sizes.mean() > 2.5


def test_zipf_bags_favour_low_rows():
    cfg = _cfg("--arch-embedding-size", "10000", "--data-generation", "zipf", "--zipf-alpha", "1.2",
               "--mini-batch-size", "500")
    counts = np.bincount(make_bags(cfg, 0, 0).indices, minlength=10000)
    uniform = np.bincount(make_bags(cfg.replace(data_generation="random"), 0, 0).indices, minlength=10000)
    assert counts[0] == counts.max() and counts[:10].sum() > 20 * uniform[:10].sum()


def test_pooling_skew_and_drift_make_tables_and_iterations_differ():
    cfg = _cfg("--arch-embedding-size", "-".join(["5000"] * 6), "--num-indices-per-lookup", "20",
               "--mini-batch-size", "200", "--pooling-skew", "1.0", "--pooling-drift", "0.5")
    per_table = [make_bags(cfg, t, 0).sizes.mean() for t in range(6)]
    per_batch = [make_bags(cfg, 0, b).sizes.mean() for b in range(6)]
    assert max(per_table) > 1.5 * min(per_table)
    assert max(per_batch) > 1.2 * min(per_batch)
    plain = _cfg("--arch-embedding-size", "5000-5000", "--mini-batch-size", "200")
    assert make_bags(plain, 0, 0).sizes.mean() != make_bags(cfg, 0, 0).sizes.mean()


def test_a_rank_generates_exactly_its_part_of_what_one_process_generates():
    cfg = _cfg("--arch-embedding-size", "30-40-50-60", "--mini-batch-size", "10", "--num-batches", "3")
    whole = load_rank_data(cfg, range(4), 0, 10, 3)
    part = load_rank_data(cfg, [1, 3], 4, 7, 3)
    for b in range(3):
        assert sorted(part.bags[b]) == [1, 3]
        for t in (1, 3):
            assert np.array_equal(part.bags[b][t].indices, whole.bags[b][t].indices)
            assert np.array_equal(part.bags[b][t].offsets, whole.bags[b][t].offsets)
        assert np.array_equal(part.dense[b], whole.dense[b][4:7])
    other_seed = load_rank_data(cfg.replace(seed=5), [1], 0, 10, 1)
    assert not np.array_equal(other_seed.dense[0], whole.dense[0])


def test_generating_the_batches_is_a_sign_of_progress():
    # mpirun's watchdog stops a run whose rank 0 shows no progress for
    # --timeout and a minute; generating many large batches showed none.
    cfg = _cfg("--arch-embedding-size", "30-40", "--mini-batch-size", "10", "--num-batches", "3")
    beats = []
    load_rank_data(cfg, [0, 1], 0, 10, 3, lambda: beats.append(1))
    assert len(beats) == 3  # one per batch (the heartbeat itself keeps to one touch per interval)


def test_placement_balances_cost_and_places_every_table_once():
    costs = [9, 1, 1, 1, 5, 5, 3, 2]
    owned = place_tables(costs, 3)
    assert sorted(t for ts in owned for t in ts) == list(range(8))
    loads = [sum(costs[t] for t in ts) for ts in owned]
    assert max(loads) - min(loads) <= max(costs)
    assert loads == [9, 9, 9]
    assert place_tables([1, 1], 4) == ((0,), (1,), (), ())  # fewer tables than ranks


def test_skewed_tables_are_spread_by_cost():
    cfg = _cfg("--arch-embedding-size", "-".join(["5000"] * 9), "--num-indices-per-lookup", "30",
               "--pooling-skew", "1.5", "--nprocs", "3")
    plan = make_plan(cfg)
    loads = [plan.load(r) for r in range(3)]
    assert max(loads) - min(loads) <= max(plan.costs)
    assert len({len(ts) for ts in plan.tables}) > 1  # unequal counts: balanced by cost, not count


def test_batch_split_is_contiguous_and_uneven_when_it_must_be():
    assert split_batch(10, 4) == ((0, 3), (3, 6), (6, 8), (8, 10))
    assert split_batch(3, 3) == ((0, 1), (1, 2), (2, 3))


def test_lag_bound_runs_from_the_synchronous_to_the_ideal_bound():
    from dlrm_bench.report import lag_bound
    rng = np.random.default_rng(3)
    work = rng.random((4, 200)) + (rng.random((4, 200)) < 0.1) * 5.0
    none = np.zeros_like(work)
    sync, ideal = work.max(axis=0).sum(), work.sum(axis=1).max()
    bounds = [lag_bound(work, none, none, none, lag) for lag in (0, 1, 2, 4, 8, 32, 1000)]
    assert np.isclose(bounds[0], sync) and np.isclose(bounds[-1], ideal)
    assert all(a >= b - 1e-12 for a, b in zip(bounds, bounds[1:]))
    assert bounds[3] < 0.97 * sync
    # two ranks alternately late: lag 1 hides it completely (each rank sums to 30)
    alternating = np.array([[1.0, 2.0] * 10, [2.0, 1.0] * 10])
    z = np.zeros_like(alternating)
    assert lag_bound(alternating, z, z, z, 0) == 40.0 and lag_bound(alternating, z, z, z, 1) == 30.0


def test_the_synchronous_bound_lets_the_bottom_mlp_overlap_a_peers_delay():
    # Rank 0 is delayed (4 s) in step 0, rank 1 in step 1; each step is 1 s
    # of lookup, 1 s of bottom MLP after publishing, 1 s after receiving.
    # Gating whole steps gave 7 + 7 = 14 s, yet a run can finish in 13: in
    # step 0 rank 1's bottom MLP runs while it waits for rank 0, and
    # rank 0 receives at 5 s, finishes at 7; rank 1 finishes step 0 at 6,
    # publishes step 1 at 11, and both finish receiving it at 12 and 13.
    from dlrm_bench.report import lag_bound
    before = np.array([[5.0, 1.0], [1.0, 5.0]])
    one, z = np.ones((2, 2)), np.zeros((2, 2))
    assert lag_bound(before, one, one, z, 0) == 13.0
    assert lag_bound(before, z, one + one, z, 0) == 14.0  # no overlap if the MLP waits for the blocks


def test_the_replay_follows_the_loop_between_the_bounds():
    from dlrm_bench.replay import replay_bls
    from dlrm_bench.report import lag_bound
    rng = np.random.default_rng(5)
    shape = (3, 150)
    delay = (rng.random(shape) < 0.1) * 5.0
    lookup, bottom, gather, top = (rng.random(shape) for _ in range(4))
    slow, z = np.zeros(shape), np.zeros(shape)
    work = delay + lookup + bottom + gather + top
    ideal = work.sum(axis=1).max()
    replays = [replay_bls(delay, lookup, bottom, gather, top, slow, lag) for lag in (0, 1, 4, 16, 1000)]
    for lag, replay in zip((0, 1, 4, 16, 1000), replays):
        assert replay >= lag_bound(delay + lookup, bottom, gather + top, slow, lag) - 1e-9
    assert all(a >= b - 1e-9 for a, b in zip(replays, replays[1:]))  # more lag never hurts here
    assert replays[0] > 1.3 * ideal and np.isclose(replays[-1], ideal)
    # work only before publishing: lag 0 is exactly the synchronous bound
    assert np.isclose(replay_bls(delay, lookup, z, z, z, slow, 0), lag_bound(delay + lookup, z, z, z, 0))
    # the fixed pipeline holds every iteration L steps, so it is never ahead of the eager one
    fixed = replay_bls(delay, lookup, bottom, gather, top, slow, 4, eager=False)
    assert fixed >= replays[2] - 1e-9


def test_the_replay_is_gated_by_completions_not_publishes():
    # Every lookup takes 1 s; rank 1 spends 10 s receiving step 0 and rank 0
    # 5 s on its bottom MLP of step 1.  At lag 0 rank 0 may post step 1 only
    # once rank 1 has left complete(0), at 11 s: it publishes at 12 and
    # ends at 17.  Gating on publishes (the lower bound) lets it publish at
    # 2 and end at 12, when rank 1's step 1 arrives; at lag 1 so does the loop.
    from dlrm_bench.replay import replay_bls
    from dlrm_bench.report import lag_bound
    one, z = np.ones((2, 2)), np.zeros((2, 2))
    bottom = np.array([[0.0, 5.0], [0.0, 0.0]])
    gather = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert replay_bls(z, one, bottom, gather, z, z, 0) == 17.0
    assert lag_bound(one, bottom, gather, z, 0) == 12.0
    assert replay_bls(z, one, bottom, gather, z, z, 1) == 12.0


def test_the_replay_sleeps_a_slow_drain_after_it_not_before():
    # Lag 1, every lookup 1 s but rank 0's last (3 s): rank 0 publishes
    # iteration 2 at 5 s.  Rank 1 publishes it at 3 s and must wait for rank
    # 0's to drain; its 3 s of drain sleep come after that wait, so it ends
    # at 8 s.  Taken as the last step's sleep (before the drain), the wait
    # hid it: the replay said 5 s.
    from dlrm_bench.replay import replay_bls
    z = np.zeros((2, 3))
    lookup = np.array([[1.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    assert replay_bls(z, lookup, z, z, z, z, 1, drain_slow=np.array([0.0, 3.0])) == 8.0
    assert replay_bls(z, lookup, z, z, z, z, 1) == 5.0


def test_a_run_summary_replays_the_drain_sleep_once_and_after_the_drain():
    # The same case as a rank records it: the drain's sleep is in slow[-1]
    # and delay[-1] (for the bounds) and in drain_slow; the replay must take
    # it out of the last step, or it counts it twice (9 s).
    from types import SimpleNamespace

    from dlrm_bench.report import summarize
    z = np.zeros(3)

    def record(before, slow, drain_slow):
        return {"start": z, "finish": z, "compute": np.array(before), "delay": np.array(slow),
                "before": np.array(before), "between": z, "after": z, "slow": np.array(slow), "held": z,
                "drain_slow": drain_slow, "slow_asked": np.array(slow), "phases": dict.fromkeys(("lookup", "bottom", "gather", "top"), 0.0),
                "cpu_compute": 1.0, "wait_s": 0.0, "begin": 0.0, "end": 8.0, "tables": [0], "slice": (0, 1)}
    results = [record([1.0, 1.0, 3.0], [0.0, 0.0, 0.0], 0.0), record([1.0, 1.0, 1.0], [0.0, 0.0, 3.0], 3.0)]
    cfg = SimpleNamespace(num_batches=3, batch_size=2, lag=1, backend="bls", bls_pipeline="eager")
    assert summarize(results, cfg)["replay_s"] == 8.0


def test_progress_bar_draws_only_when_enabled(capsys):
    from dlrm_bench.worker import Progress
    bar = Progress(True, "bls lag 4", 10, 256)
    bar.update(10)
    Progress(False, "quiet", 10, 256).update(10)
    err = capsys.readouterr().err
    assert err.startswith("\r  bls lag 4 [") and "10/10 batches" in err and err.endswith("\n")
    assert "quiet" not in err


def test_a_relayed_progress_bar_is_drawn_by_the_reader(tmp_path, capsys):
    # An MPI rank's stderr is mpirun's: rank 0 writes the state, the parent draws it.
    from dlrm_bench.worker import Progress, RelayedProgress
    path = str(tmp_path / "progress")
    reader = RelayedProgress(path, "mpi", 10, 256)
    reader.poll()
    reader.close()  # nothing written yet: nothing drawn, no line ended
    writer = Progress(True, "mpi", 10, 256, relay=path, draw=False)
    writer.last = float("-inf")  # past the redraw interval
    writer.update(4)
    assert capsys.readouterr().err == ""
    reader.poll()
    reader.poll()  # unchanged: not drawn again
    err = capsys.readouterr().err
    assert err.count("\r") == 1 and "mpi [############..................] 4/10 batches" in err
    reader.close()  # the run ended early: the line is ended for what follows
    assert capsys.readouterr().err == "\n"
    writer.update(10)
    reader.poll()
    reader.close()  # finished: the bar ended its own line
    err = capsys.readouterr().err
    assert "10/10 batches" in err and err.endswith("\n") and err.count("\n") == 1


_BEATS = """
import os, sys, time
path, beats, then = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for _ in range(beats):
    with open(path, "a"):
        os.utime(path)
    time.sleep(0.05)
time.sleep(then)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("beats, then, stalls", [(150, 0, False), (1, 30, True)], ids=["long", "stalled"])
def test_an_mpi_run_is_stopped_when_it_stalls_not_when_it_is_long(tmp_path, monkeypatch, beats, then, stalls):
    # The limit was on the whole run (--timeout + 60 s + 1 s per batch):
    # delays or a slow rank that made the run long, not stuck, had it killed.
    import subprocess
    import sys
    import time
    from dlrm_bench import backends
    monkeypatch.setattr(backends, "MPI_STALL_SLACK_S", 2.3)  # no progress for 2.5 s is a stall
    heartbeat = str(tmp_path / "heartbeat")
    proc = subprocess.Popen([sys.executable, "-c", _BEATS, heartbeat, str(beats), str(then)])
    try:
        start = time.monotonic()
        if stalls:
            with pytest.raises(backends.BackendError, match=r"rank 0 showed no progress for 2.5 s \(--timeout 0.2 s"):
                backends._wait_watching(proc, heartbeat, 0.2, None)
            assert proc.poll() is None and time.monotonic() - start < 20
        else:
            backends._wait_watching(proc, heartbeat, 0.2, None)  # 7.5 s in all, a beat every 0.05 s
            assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank_error", [False, True], ids=["mpirun's output", "a rank's error"])
def test_a_stalled_mpi_run_says_what_mpirun_and_the_ranks_said(monkeypatch, rank_error):
    # The stall's message came alone: mpirun's output and the ranks' errors
    # were deleted with the run's directory unread.
    import sys
    from dlrm_bench import backends
    script = ("import os, sys, time; print('mpirun: rank 1 is stuck in its setup', flush=True)\n"
              f"if {rank_error}: open(os.path.join(os.path.dirname(sys.argv[1]), 'rank1.err'), 'w')"
              ".write('ValueError: no such table')\n"
              "time.sleep(60)")
    monkeypatch.setattr(backends, "mpirun_command", lambda n, job: [sys.executable, "-c", script, job])
    monkeypatch.setattr(backends, "MPI_STALL_SLACK_S", 1.0)
    cfg = _cfg("--backend", "mpi", "--timeout", "0.5")
    with pytest.raises(backends.BackendError, match=r"rank 0 showed no progress for 1.5 s") as info:
        backends.run_mpi(cfg, "mpi", None)
    said = "rank 1 raised ValueError: no such table" if rank_error else "mpirun: rank 1 is stuck in its setup"
    assert said in str(info.value)


def test_every_progress_update_is_a_heartbeat(tmp_path):
    from dlrm_bench.worker import Heartbeat, Progress
    path = tmp_path / "heartbeat"
    quiet = Progress(False, "", 1, 0, heartbeat=Heartbeat(str(path)))
    quiet.update(1)
    assert path.exists()
    Heartbeat()()  # without a path: nothing


def test_a_bar_drawn_by_a_rank_is_also_relayed_so_the_parent_can_end_its_line(tmp_path, capsys):
    from dlrm_bench.worker import Progress, RelayedProgress
    path = str(tmp_path / "progress")
    writer = Progress(True, "bls lag 4", 10, 256, relay=path)
    writer.last = float("-inf")
    writer.update(3)
    assert "3/10 batches" in capsys.readouterr().err
    RelayedProgress(path, "bls lag 4", 10, 256).close()
    assert capsys.readouterr().err == "\n"


def test_the_capacity_bound_is_printed_only_when_ranks_share_cores():
    # With a core per rank, CPU time read just after the wall clock made the
    # capacity bound a hair above the ideal, and the report said ranks shared cores.
    import io
    from dlrm_bench.report import print_run
    fig = dict(samples_per_s=1000.0, wall_s=1.0, p50_ms=1.0, p99_ms=2.0, wait_share=0.1, sync_bound_s=0.9,
               ideal_bound_s=0.8, wall_over_ideal=1.25, lag_bound_s=0.85, capacity_bound_s=0.801,
               wall_over_best_bound=1.248, oversubscribed=False)
    out = io.StringIO()
    print_run("bls lag 4", fig, 4, out)
    assert "share cores" not in out.getvalue()
    fig["oversubscribed"] = True
    print_run("bls lag 4", fig, 4, out)
    assert "ranks share cores: capacity bound 0.80 s" in out.getvalue()


@pytest.mark.parametrize("fixed", [False, True])
def test_an_extreme_skew_or_drift_caps_bags_at_the_table_instead_of_overflowing(fixed):
    # exp(50 z) overflowed (numpy warnings), and a fixed bag size had no cap at all.
    cfg = _cfg("--arch-embedding-size", "300-300-300-300", "--mini-batch-size", "50",
               "--pooling-skew", "40", "--pooling-drift", "50").replace(indices_per_lookup_fixed=fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sizes = [make_bags(cfg, t, b).sizes for t in range(4) for b in range(8)]
        assert all(expected_pooling(cfg, t) <= 300 for t in range(4))
    assert max(s.max() for s in sizes) <= 300 and min(s.min() for s in sizes) >= 1
    assert any(s.max() > 150 for s in sizes) and any(s.max() == 1 for s in sizes)  # both tails reached


def test_a_table_drawn_in_chunks_is_the_table_drawn_at_once():
    """Chunks keep the peak at the table's float32 size; the values must not change."""
    from dlrm_bench.model import TABLE_STREAM, init_table
    rows, dim, seed = 37, 6, 11
    rng = np.random.default_rng([seed, TABLE_STREAM, 2])
    bound = np.sqrt(1.0 / rows)
    at_once = rng.uniform(-bound, bound, size=(rows, dim)).astype(np.float32)
    beats = []
    for chunk_values in (1, 6, 25, 1 << 22):
        chunked = init_table(rows, dim, 2, seed, beat=lambda: beats.append(1), chunk_values=chunk_values)
        assert chunked.dtype == np.float32
        np.testing.assert_array_equal(chunked, at_once)
    assert len(beats) == 37 + 37 + 10 + 1  # a beat per chunk of rows


def test_the_memory_check_counts_the_bls_arenas_of_bls_runs_only():
    from dlrm_bench.backends import arena_bytes
    from dlrm_bench.config import _memory_parts
    cfg, _ = parse(["--lag", "64", "--nprocs", "2"])
    arenas = {k: v for k, v in _memory_parts(cfg, bls=True).items() if "bls arenas" in k}
    assert arenas == {"the bls arenas of --lag 64, for each of --nprocs 2": 2 * arena_bytes(cfg)}
    assert not any("bls arenas" in k for k in _memory_parts(cfg, bls=False))


def test_injected_sleeps_pay_back_what_they_overslept(monkeypatch):
    # A sleep on a busy machine wakes late (5 ms took 10.8), more under one
    # backend than another: --compare then injected different delays.
    from types import SimpleNamespace

    from dlrm_bench import worker
    asked = []

    def late_sleep(seconds):
        asked.append(seconds)
        return seconds * 2 if len(asked) == 1 else seconds  # the first wakes twice as late

    monkeypatch.setattr(worker, "_sleep", late_sleep)
    rank = SimpleNamespace(sleep_owed={"delay": 0.0, "slow": 0.0}, cfg=SimpleNamespace(slow_factor=3.0))
    slept = [worker.Rank.inject(rank, s, "delay") for s in (0.005, 0.003, 0.0, 0.005)]
    assert slept == [0.010, 0.0, 0.0, pytest.approx(0.003)]  # 13 ms asked, 13 ms slept
    assert asked == [0.005, pytest.approx(0.003)]  # no sleep while repaying, none for nothing
    # A slow rank sleeps (F - 1) times the step's CPU time, which no backend's waits inflate.
    rank.inject = lambda seconds, kind: worker.Rank.inject(rank, seconds, kind)
    rank.cfg.slow_steps_s = ()
    rec = worker.Record(1)
    assert worker.Rank.slow_sleep(rank, rec, 0, 0.002) == pytest.approx(0.004)
    assert rec.slow_asked.tolist() == [pytest.approx(0.004), 0.0]


def test_a_slow_ranks_oversleep_is_not_paid_back_from_the_random_delays(monkeypatch):
    # One balance for both kinds: the slow rank's short sleeps overslept, and
    # the 5 ms delays were cut to pay it back (1.1 ms slept under bls), by
    # how much depending on the backend, so the backends met other spikes.
    from types import SimpleNamespace

    from dlrm_bench import worker
    monkeypatch.setattr(worker, "_sleep", lambda seconds: seconds + 0.001)  # every sleep wakes 1 ms late
    rank = SimpleNamespace(sleep_owed={"delay": 0.0, "slow": 0.0},
                           cfg=SimpleNamespace(slow_factor=1.5, delay_ms=5.0, slow_steps_s=()), delayed=[True])
    rank.inject = lambda seconds, kind: worker.Rank.inject(rank, seconds, kind)
    rec = worker.Record(3)
    for i in range(3):
        assert worker.Rank.slow_sleep(rank, rec, i, 0.001) >= 0.0  # 0.5 ms asked, 1.5 ms or none slept
    assert worker.Rank.injected_delay(rank, 0) == pytest.approx(0.006)  # the spike as asked (and late)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_compare_rounds_put_every_run_in_every_place_and_after_every_other_once(n):
    runs = list("ABCDE"[:n])
    cycle = n if n % 2 == 0 else 2 * n
    orders = [round_order(runs, k) for k in range(cycle)]
    assert orders[0] == runs and round_order(runs, cycle + 1) == orders[1]
    for position in range(n):
        assert sorted(o[position] for o in orders) == sorted(runs * (cycle // n))
    follows = [(o[j], o[j + 1]) for o in orders for j in range(n - 1)]
    assert sorted(follows) == sorted([(a, b) for a in runs for b in runs if a != b] * (cycle // n)), follows


def _fig(samples_per_s, compute=1.0, oversubscribed=False, cpu=(1.0, 1.0)):
    return {"samples_per_s": samples_per_s, "compute_s_per_rank": [compute, compute / 2],
            "oversubscribed": oversubscribed, "cpu_compute_s_per_rank": list(cpu)}


def test_a_runs_figures_are_its_median_rounds_and_a_failed_round_is_named():
    done = [("a", 0, _fig(5)), ("a", 1, _fig(9)), ("a", 2, _fig(7)), ("b", 0, _fig(1)), ("b", 1, "failed: X")]
    assert median_round(done, "a", 3)["samples_per_s"] == 7
    assert median_round(done[:2], "a", 2)["samples_per_s"] == 5  # even: the lower middle
    assert median_round(done, "b", 3) == "failed: X (round 2)"
    assert median_round(done[3:], "b", 1) == "failed: X"


def test_ratios_are_paired_by_round_over_the_rounds_where_both_ran():
    done = [("m", 0, _fig(10)), ("o", 0, _fig(5)), ("o", 1, _fig(2)), ("m", 1, _fig(8)),
            ("m", 2, _fig(30)), ("o", 2, "failed: X")]
    r = paired_ratios(done, "m", ["m", "o", "absent"])
    assert r == {"o": {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 2}}


def test_compute_that_differs_between_runs_of_a_round_is_noted():
    same = [("a", 0, _fig(1, compute=2.0)), ("b", 0, _fig(1, compute=2.2))]
    assert compute_drift_notes(same, 1) == []
    drift = [("a", 0, _fig(1, compute=2.0)), ("b", 0, _fig(1, compute=5.8)), ("c", 0, "failed: X")]
    (note,) = compute_drift_notes(drift, 1)
    # Rounds that balance the orders (round_order): twice the runs when they are odd.
    assert "2.90x as long in b as in a" in note and "--rounds 6 " in note
    (note,) = compute_drift_notes(drift + [("d", 0, _fig(1, compute=2.1))], 1)
    assert "--rounds 4 " in note
    (note,) = compute_drift_notes([(label, 1, fig) for label, _, fig in drift], 2)
    assert " in round 2 " in note and "--rounds" not in note
    assert compute_drift_notes([("a", 0, _fig(1, compute=0.1)), ("b", 0, _fig(1, compute=0.3))], 1) == []
    # Ranks sharing cores wait for each other's compute: their CPU seconds are compared.
    shared = [("a", 0, _fig(1, compute=9.0, oversubscribed=True)),
              ("b", 0, _fig(1, compute=2.0, oversubscribed=True, cpu=(1.1, 1.0)))]
    assert compute_drift_notes(shared, 1) == []
