"""Distributed DLRM predictions equal a single-process computation, bit for bit.

Every rank count 1..4 meets lags 0, 1 and 4 and both generators; the table
count (5) is not a multiple of 2, 3 or 4, and the global batch (11) splits
unevenly across 2, 3 and 4 ranks.  Random per-rank delays shuffle the
timing, which must not change a single bit.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from dlrm_bench import backends, report
from dlrm_bench.config import mpi_available, parse
from dlrm_bench.verify import compare, reference_predictions

SMALL = ["--arch-embedding-size", "40-7-300-25-90", "--arch-sparse-feature-size", "8",
         "--arch-mlp-bot", "5-16-8", "--arch-mlp-top", "12-1", "--mini-batch-size", "11",
         "--num-batches", "13", "--data-size", "55", "--num-indices-per-lookup", "6",
         "--warmup-batches", "3", "--timeout", "60"]


def _run(*flags):
    cfg, _ = parse(SMALL + list(flags))
    results = backends.run(cfg, "test")
    return cfg, results, report.predictions(results)


CASES = [(p, lag, gen) for p in (1, 2, 3, 4) for lag in (0, 1, 4)
         for gen in (("random",) if (p + lag) % 2 else ("zipf",))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nprocs,lag,generation", CASES)
def test_bls_predictions_equal_single_process(nprocs, lag, generation):
    cfg, results, pred = _run("--nprocs", str(nprocs), "--lag", str(lag), "--data-generation", generation,
                              "--delay-prob", "0.3", "--delay-ms", "1")
    assert pred.shape == (13, 11)
    assert compare(pred, reference_predictions(cfg)) == (0, 0.0, 0)
    assert sorted(t for r in results for t in r["tables"]) == list(range(5))
    sizes = [hi - lo for lo, hi in (r["slice"] for r in results)]
    assert sum(sizes) == 11 and max(sizes) - min(sizes) <= 1


@pytest.mark.timeout(120)
def test_the_fixed_pipeline_of_design_2_is_exact_too():
    cfg, _, pred = _run("--nprocs", "3", "--lag", "2", "--bls-pipeline", "fixed",
                        "--delay-prob", "0.3", "--delay-ms", "1")
    assert compare(pred, reference_predictions(cfg)) == (0, 0.0, 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_synchronous_backends_give_the_same_predictions(backend):
    if backend == "mpi" and mpi_available():
        pytest.skip(mpi_available())
    cfg, _, pred = _run("--nprocs", "3", "--backend", backend, "--data-generation", "zipf")
    assert compare(pred, reference_predictions(cfg)) == (0, 0.0, 0)


@pytest.mark.timeout(120)
def test_delays_and_the_slow_rank_are_recorded_where_injected():
    cfg, results, _ = _run("--nprocs", "3", "--lag", "2", "--delay-prob", "1", "--delay-ms", "2",
                           "--slow-rank", "1", "--slow-factor", "3")
    fig = report.summarize(results, cfg)
    # every iteration of every rank slept 2 ms; rank 1 also slept twice its compute
    assert all(d >= 13 * 0.002 for d in fig["delay_s_per_rank"])
    extra = np.array(fig["delay_s_per_rank"]) - np.array([r["delay"][r["delay"] > 0].size * 0.002
                                                          for r in results])
    # (of its compute's CPU time: wall time also counts the waits for a shared
    # core), and at least that: sleeps pay back what earlier ones overslept
    assert fig["slow_asked_s_per_rank"][1] == pytest.approx(2 * fig["cpu_compute_s_per_rank"][1], rel=1e-9)
    assert extra[1] >= fig["slow_asked_s_per_rank"][1] > 0
    assert fig["sync_bound_s"] >= fig["ideal_bound_s"] >= max(fig["delay_s_per_rank"])
    assert fig["replay_s"] >= fig["ideal_bound_s"] - 1e-9  # the replay does every measured part, serially
    cfg0, results0, _ = _run("--nprocs", "3")
    assert sum(report.summarize(results0, cfg0)["delay_s_per_rank"]) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["bls", "gloo"])
def test_a_slow_ranks_sleeps_given_are_the_sleeps_taken(backend):
    # Derived from each run's own CPU time, gloo's slow rank slept 1.6 times
    # what bls's did for the same work (gloo's threads share the caches):
    # --compare now repeats the first run's sleeps, step by step.
    lag = ["--lag", "1"] if backend == "bls" else []  # with a drain, whose sleep is the last
    cfg, _ = parse(SMALL + ["--nprocs", "2", *lag, "--backend", backend, "--slow-rank", "1", "--slow-factor", "2"])
    asked = tuple(0.001 * (1 + i % 3) for i in range(cfg.num_batches)) + (0.002,)  # the drain's last
    results = backends.run(cfg.replace(slow_steps_s=asked), "test")
    assert results[1]["slow_asked"].tolist() == list(asked) and not results[0]["slow_asked"].any()
    fig = report.summarize(results, cfg)
    assert fig["slow_asked_s_per_rank"] == [0.0, pytest.approx(sum(asked))]
    assert fig["slow_s_per_rank"][0] == 0 and fig["slow_s_per_rank"][1] > 0  # slept, give or take overshoots
    # Unset, the sleeps follow the run's CPU time: (F - 1) x each step's.
    measured = backends.run(cfg, "test")[1]["slow_asked"]
    assert measured[:-1].all() and measured.sum() > 0


@pytest.mark.timeout(300)
def test_command_line_compare_verify_json_and_predictions(tmp_path):
    """The whole command: --compare runs every backend, --verify checks them, files are written."""
    out_json, out_npy = tmp_path / "run.json", tmp_path / "predictions"  # the name given, no ".npy" added
    cmd = [sys.executable, "-m", "dlrm_bench", *SMALL, "--nprocs", "2", "--lag", "2", "--compare",
           "--verify", "--json", str(out_json), "--save-predictions", str(out_npy),
           "--slow-rank", "1", "--slow-factor", "1.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bitwise identical across" in proc.stdout
    assert proc.stdout.count("bitwise equal to a single-process recomputation") >= 3
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    doc = json.loads(out_json.read_text())
    for key in ("samples_per_s", "p50_ms", "p99_ms", "sync_bound_s", "ideal_bound_s", "wall_s"):
        assert doc[key] > 0
    assert doc["run"] == "bls lag 2" and doc["config"]["nprocs"] == 2
    assert doc["environment"]["ranks"] == 2 and "oversubscribed" in doc["environment"]
    assert [r["label"] for r in doc["runs"]][:3] == ["bls lag 0", "bls lag 2", "gloo"]
    # The first run's slow sleeps are every run's (a sleep's overshoot is paid back, the last's not).
    assert "rank 1's slow sleeps, 1.5 - 1 times its CPU time per step in bls lag 0, are repeated" in proc.stdout
    asked = [r["slow_asked_s_per_rank"] for r in doc["runs"]]
    assert asked[0][1] > 0 and all(a == [0.0, pytest.approx(asked[0][1])] for a in asked), asked
    assert "slow_steps_s" not in doc["config"]
    assert all(v["mismatches"] == 0 for v in doc["verify"].values())
    pred = np.load(out_npy)
    assert pred.shape == (13 * 11,) and pred.dtype == np.float32
    cfg, _ = parse(SMALL)
    ref = reference_predictions(cfg)
    assert np.array_equal(pred.reshape(13, 11), ref[np.arange(13) % len(ref)])
