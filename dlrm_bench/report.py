"""Figures of a run from its ranks' records, and how they are printed and saved.

- samples/s: timed samples over the wall time, from the first rank starting
  its timed loop to the last rank finishing it;
- iteration latency of a global batch: from the first rank starting it to
  the last rank emitting its predictions (at lag ``L`` this includes the
  ``L`` iterations a batch waits in the pipeline: lag buys throughput);
- waiting share: time inside the collective's calls (bls: entering and
  leaving post_views and complete_views, waits included, and arrived) over
  the rank's own timed loop, averaged over ranks.  gloo's and MPI's collective also
  copies the blocks from the send buffer to the receive buffer; bls, zero
  copy, has no such copy: its lookup writes the blocks straight into shared
  memory (its record, or the receivers' mailboxes when every block fits
  one, 80 B) and its gather reads them there, so that work counts as compute;
- bounds, from each rank's own measured compute and injected delays per
  iteration, split where the exchange divides them (see :func:`lag_bound`):
  ideal bounded lag ``max_r sum_t work[r, t]``, what no schedule can beat;
  synchronous, the same work with free communication when no rank may
  publish ``t`` before every rank published ``t - 1`` and no rank may
  receive ``t`` before every rank published it, what a synchronous
  collective cannot beat; and between them the lag-``L`` bound, where a
  rank may publish ``t`` once every rank published ``t - L - 1``: what lag
  ``L`` itself permits.  The ideal bounds every run; the lag-``L`` bound
  every run at lag ``L`` or less, so the synchronous one (lag 0) bounds
  synchronous runs, and a run at lag ``L > 0`` may beat it: that is the
  point of the lag.
- for bls runs, the replay (:mod:`dlrm_bench.replay`): the same loop from the
  same measured times with a free exchange.  Wall over replay is what the
  exchange cost; replay over ideal is what the lag rule left of the delays.
Compute is wall-clock time, so when ranks outnumber cores it includes time
a rank waited for a core, and the bounds above assume a core per rank.  The
capacity bound covers that case: the CPU seconds all ranks spent computing
over the cores they share (at most one per rank).  No schedule beats the
larger of the ideal and the capacity bound.
"""
import json
import os
import platform
import sys

import numpy as np

from dlrm_bench.replay import replay_bls


def lag_bound(before, between, after, slow, lag):
    """A lower bound on the wall time of the measured work at lag ``lag``, communication free.

    Arrays are ``[rank, iteration]`` seconds: ``before`` a rank publishes
    ``t`` (injected delay, lookup), ``between`` publishing and receiving
    (the bottom MLP, which every backend overlaps with waiting for peers),
    ``after`` receiving (gather, top MLP),
    and ``slow``, a slow rank's sleep at the end of its step ``t``.  At lag
    0 a rank's step is strictly serial; above it, only what lies between
    two of its publishes is (its completions may interleave), so the bound
    counts only that.  Every rule used is implied by the real loops, and a
    gate is never later than the real one (every rank has *published*
    ``t - L - 1`` before it has completed it): the bound never exceeds what
    a run can do.  Whole iterations gated as one block gave no bound: a
    rank's bottom MLP overlaps its peers' delays, and runs beat that figure.
    """
    nprocs, n = before.shape
    published = np.zeros(n)  # when the last rank published t
    pub = np.zeros(nprocs)    # when each rank published its latest iteration
    end = np.zeros(nprocs)    # when each rank finished receiving its latest iteration
    last = 0.0
    for t in range(n):
        if t == 0:
            ready = np.zeros(nprocs)
        elif lag == 0:
            ready = end + slow[:, t - 1]
        else:
            ready = pub + between[:, t - 1] + slow[:, t - 1]
        gate = published[t - lag - 1] if t - lag - 1 >= 0 else 0.0
        pub = np.maximum(ready, gate) + before[:, t]
        published[t] = pub.max()
        end = np.maximum(published[t], pub + between[:, t]) + after[:, t]
        last = max(last, float(end.max()))
    ideal = float((before + between + after + slow).sum(axis=1).max()) if n else 0.0
    return max(last, ideal)


def summarize(results, cfg):
    """Every figure of one run (a dict of plain numbers)."""
    starts = np.stack([r["start"] for r in results])
    finishes = np.stack([r["finish"] for r in results])
    work = np.stack([r["compute"] + r["delay"] for r in results])
    compute = np.stack([r["compute"] for r in results])
    delay = np.stack([r["delay"] for r in results])
    parts = [np.stack([r[k] for r in results]) for k in ("before", "between", "after", "slow")]
    begin = min(r["begin"] for r in results)
    end = max(r["end"] for r in results)
    wall = end - begin
    latency_ms = (finishes.max(axis=0) - starts.min(axis=0)) * 1e3
    samples = cfg.num_batches * cfg.batch_size
    ideal = float(work.sum(axis=1).max())
    usable = len(os.sched_getaffinity(0))
    cores = min(usable, len(results))
    capacity = float(sum(r["cpu_compute"] for r in results)) / cores
    fig = {
        "samples_per_s": samples / wall,
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        "wall_s": wall,
        "sync_bound_s": lag_bound(*parts, 0),
        "ideal_bound_s": ideal,
        "lag_bound_s": lag_bound(*parts, cfg.lag if cfg.backend == "bls" else 0),
        "capacity_bound_s": capacity,
        "oversubscribed": len(results) > usable,
        "wall_over_best_bound": wall / max(ideal, capacity) if max(ideal, capacity) > 0 else float("nan"),
        "cpu_compute_s_per_rank": [r["cpu_compute"] for r in results],
        "wall_over_ideal": wall / ideal if ideal > 0 else float("nan"),
        "wait_share": float(np.mean([r["wait_s"] / (r["end"] - r["begin"]) for r in results])),
        "compute_s_per_rank": compute.sum(axis=1).tolist(),
        "delay_s_per_rank": delay.sum(axis=1).tolist(),  # the slow rank's sleeps included
        "slow_s_per_rank": parts[3].sum(axis=1).tolist(),  # slept, give or take the last oversleep
        "slow_asked_s_per_rank": [float(r["slow_asked"].sum()) for r in results],  # alike across a --compare
        "wait_s_per_rank": [r["wait_s"] for r in results],
        "phase_s_per_rank": {k: [r["phases"][k] for r in results] for k in results[0]["phases"]},
        "tables_per_rank": [r["tables"] for r in results],
        "slices": [list(r["slice"]) for r in results],
    }
    if cfg.backend == "bls":
        before, between, after, slow = parts
        held = np.stack([r["held"] for r in results])
        injected = delay - slow
        drain_slow = np.array([r["drain_slow"] for r in results])
        step_slow = slow.copy()  # the drain's sleep comes after the drain, not before it
        if step_slow.shape[1]:
            step_slow[:, -1] -= drain_slow
        replay = replay_bls(injected, before - injected, between, held, after - held, step_slow, cfg.lag,
                            eager=cfg.bls_pipeline == "eager", drain_slow=drain_slow)
        fig["replay_s"] = replay
        fig["wall_over_replay"] = wall / replay if replay > 0 else float("nan")
    if "futex_sleeps" in results[0]:
        fig["futex_sleeps"] = int(sum(r["futex_sleeps"] for r in results))
    if "mpi_library" in results[0]:
        fig["mpi_library"] = results[0]["mpi_library"]
    return fig


def predictions(results):
    """``(num_batches, B)``: every rank's slice side by side, in global sample order."""
    return np.concatenate([r["predictions"] for r in results], axis=1)


def environment(cfg):
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    import numpy
    import torch

    import blsshm
    return {
        "cores": cores, "usable_cores": usable, "ranks": cfg.nprocs,
        "oversubscribed": cfg.nprocs > usable, "python": sys.version.split()[0],
        "platform": platform.platform(), "numpy": numpy.__version__, "torch": torch.__version__,
        "blsshm": blsshm.__version__, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def run_label(backend, lag):
    return f"bls lag {lag}" if backend == "bls" else backend


def describe(cfg, plan):
    sizes = "+".join(str(len(t)) for t in plan.tables)
    split = "+".join(str(hi - lo) for lo, hi in plan.slices)
    usable = len(os.sched_getaffinity(0))
    over = ", oversubscribed" if cfg.nprocs > usable else ""
    delays = ""
    if cfg.delay_prob > 0 and cfg.delay_ms > 0:
        delays += f", delays {cfg.delay_ms:g} ms with p={cfg.delay_prob:g}"
    if cfg.slow_rank >= 0 and cfg.slow_factor > 1:
        delays += f", rank {cfg.slow_rank} x{cfg.slow_factor:g} slower"
    interaction = ""
    if cfg.interaction_op != "dot" or cfg.interaction_itself:
        interaction = " (cat interaction)" if cfg.interaction_op == "cat" else " (dot interaction with itself)"
    return (f"{cfg.nprocs} ranks on {usable} cores{over}; {len(cfg.table_rows)} tables ({sizes}) "
            f"of width {cfg.sparse_size}{interaction}; batch {cfg.batch_size} ({split}); {cfg.num_batches} batches "
            f"of {cfg.data_generation} data{delays}")


def print_run(label, fig, lag, out=None):
    out = out or sys.stdout  # the one of the call, not of the import
    p = lambda s: print(s, file=out)  # noqa: E731
    p(f"{label}: {fig['samples_per_s']:,.0f} samples/s in {fig['wall_s']:.2f} s; "
      f"iteration latency p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms; "
      f"waiting {100 * fig['wait_share']:.1f}% of the time")
    p(f"  bounds: synchronous {fig['sync_bound_s']:.2f} s, ideal bounded-lag {fig['ideal_bound_s']:.2f} s; "
      f"wall is {fig['wall_over_ideal']:.3f}x the ideal; lag-{lag} bound {fig['lag_bound_s']:.2f} s")
    if "replay_s" in fig:
        p(f"  replayed with a free exchange: {fig['replay_s']:.2f} s, {fig['replay_s'] / fig['ideal_bound_s']:.3f}x "
          f"the ideal (what the lag rule costs); wall is {fig['wall_over_replay']:.3f}x it (what the exchange costs)")
    # With a core per rank the capacity bound is the ideal one: CPU time read
    # after the wall clock then only makes it look a hair larger.
    if fig["oversubscribed"] and fig["capacity_bound_s"] > fig["ideal_bound_s"]:
        p(f"  ranks share cores: capacity bound {fig['capacity_bound_s']:.2f} s (CPU seconds of compute "
          f"over the cores); wall is {fig['wall_over_best_bound']:.3f}x it")


COLUMNS = (("run", 10, "{:<10}"), ("samples/s", 10, "{:>10,.0f}"), ("p50 ms", 7, "{:>7.2f}"),
           ("p99 ms", 7, "{:>7.2f}"), ("wait %", 6, "{:>6.1f}"), ("wall s", 7, "{:>7.2f}"),
           ("sync s", 7, "{:>7.2f}"), ("ideal s", 7, "{:>7.2f}"), ("lag s", 7, "{:>7.2f}"),
           ("wall/ideal", 10, "{:>10.3f}"),
           ("vs gloo", 7, "{:>7}"))


def print_table(rows, versus_gloo, out=None):
    """One line per run: ``rows`` is ``[(label, figures, or why the run has none)]``.

    ``versus_gloo``: ``{label: {"median": ...} or None}``, each run's
    samples/s over gloo's, paired by round (with one round, simply divided).
    """
    out = out or sys.stdout
    print("  ".join(name.ljust(w) if i == 0 else name.rjust(w)
                    for i, (name, w, _) in enumerate(COLUMNS)), file=out)
    for label, fig in rows:
        if not isinstance(fig, dict):
            print(f"{label:<10}  {fig}", file=out)
            continue
        paired = versus_gloo.get(label)
        speedup = "1.00x" if label == "gloo" else f"{paired['median']:.2f}x" if paired else "-"
        values = (label, fig["samples_per_s"], fig["p50_ms"], fig["p99_ms"], 100 * fig["wait_share"],
                  fig["wall_s"], fig["sync_bound_s"], fig["ideal_bound_s"], fig["lag_bound_s"],
                  fig["wall_over_ideal"], speedup)
        print("  ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values)), file=out)


def write_json(path, cfg, main_fig, runs, extra):
    doc = dict(main_fig)
    doc["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
                     if k != "slow_steps_s"}  # a run's own, not the command's
    doc["environment"] = environment(cfg)
    doc["runs"] = runs
    doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=float)
