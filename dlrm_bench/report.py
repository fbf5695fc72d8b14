"""Figures of a run from its ranks' records, and how they are printed and saved.

- samples/s: timed samples over the wall time, from the first rank starting
  its timed loop to the last rank finishing it;
- iteration latency of a global batch: from the first rank starting it to
  the last rank emitting its predictions (at lag ``L`` this includes the
  ``L`` iterations a batch waits in the pipeline: lag buys throughput);
- waiting share: time inside the collective (bls: waits in post and
  complete) over the wall time, averaged over ranks;
- bounds, from each rank's own measured compute and injected delays per
  iteration (``work[r, t]``): synchronous ``sum_t max_r work[r, t]``,
  what a synchronous collective cannot beat; ideal bounded lag
  ``max_r sum_t work[r, t]``, what no schedule can beat; and between them
  the lag-``L`` bound, the same work scheduled with free communication
  under the rule that no rank starts iteration ``t`` before every rank has
  finished ``t - L - 1`` (lag 0 gives the synchronous bound, an unbounded
  lag the ideal): what lag ``L`` itself permits.
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


def lag_bound(work, lag):
    """Finish time of the lag-``lag`` schedule of ``work[r, t]`` with free communication."""
    nprocs, n = work.shape
    slowest = np.zeros(n)  # when the last rank finished iteration t
    own = np.zeros(nprocs)  # when each rank finished its latest iteration
    for t in range(n):
        gate = slowest[t - lag - 1] if t - lag - 1 >= 0 else 0.0
        own = np.maximum(own, gate) + work[:, t]
        slowest[t] = own.max()
    return float(slowest[-1]) if n else 0.0


def summarize(results, cfg):
    """Every figure of one run (a dict of plain numbers)."""
    starts = np.stack([r["start"] for r in results])
    finishes = np.stack([r["finish"] for r in results])
    work = np.stack([r["compute"] + r["delay"] for r in results])
    compute = np.stack([r["compute"] for r in results])
    delay = np.stack([r["delay"] for r in results])
    begin = min(r["begin"] for r in results)
    end = max(r["end"] for r in results)
    wall = end - begin
    latency_ms = (finishes.max(axis=0) - starts.min(axis=0)) * 1e3
    samples = cfg.num_batches * cfg.batch_size
    ideal = float(work.sum(axis=1).max())
    cores = min(len(os.sched_getaffinity(0)), len(results))
    capacity = float(sum(r["cpu_compute"] for r in results)) / cores
    fig = {
        "samples_per_s": samples / wall,
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        "wall_s": wall,
        "sync_bound_s": float(work.max(axis=0).sum()),
        "ideal_bound_s": ideal,
        "lag_bound_s": lag_bound(work, cfg.lag if cfg.backend == "bls" else 0),
        "capacity_bound_s": capacity,
        "wall_over_best_bound": wall / max(ideal, capacity) if max(ideal, capacity) > 0 else float("nan"),
        "cpu_compute_s_per_rank": [r["cpu_compute"] for r in results],
        "wall_over_ideal": wall / ideal if ideal > 0 else float("nan"),
        "wait_share": float(np.mean([r["wait_s"] / (r["end"] - r["begin"]) for r in results])),
        "compute_s_per_rank": compute.sum(axis=1).tolist(),
        "delay_s_per_rank": delay.sum(axis=1).tolist(),
        "wait_s_per_rank": [r["wait_s"] for r in results],
        "phase_s_per_rank": {k: [r["phases"][k] for r in results] for k in results[0]["phases"]},
        "tables_per_rank": [r["tables"] for r in results],
        "slices": [list(r["slice"]) for r in results],
    }
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
    return (f"{cfg.nprocs} ranks on {usable} cores{over}; {len(cfg.table_rows)} tables ({sizes}) "
            f"of width {cfg.sparse_size}; batch {cfg.batch_size} ({split}); {cfg.num_batches} batches "
            f"of {cfg.data_generation} data{delays}")


def print_run(label, fig, lag, out=sys.stdout):
    p = lambda s: print(s, file=out)  # noqa: E731
    p(f"{label}: {fig['samples_per_s']:,.0f} samples/s in {fig['wall_s']:.2f} s; "
      f"iteration latency p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms; "
      f"waiting {100 * fig['wait_share']:.1f}% of the time")
    p(f"  bounds: synchronous {fig['sync_bound_s']:.2f} s, ideal bounded-lag {fig['ideal_bound_s']:.2f} s; "
      f"wall is {fig['wall_over_ideal']:.3f}x the ideal; lag-{lag} bound {fig['lag_bound_s']:.2f} s")
    if fig["capacity_bound_s"] > fig["ideal_bound_s"]:
        p(f"  ranks share cores: capacity bound {fig['capacity_bound_s']:.2f} s (CPU seconds of compute "
          f"over the cores); wall is {fig['wall_over_best_bound']:.3f}x it")


COLUMNS = (("run", 10, "{:<10}"), ("samples/s", 10, "{:>10,.0f}"), ("p50 ms", 7, "{:>7.2f}"),
           ("p99 ms", 7, "{:>7.2f}"), ("wait %", 6, "{:>6.1f}"), ("wall s", 7, "{:>7.2f}"),
           ("sync s", 7, "{:>7.2f}"), ("ideal s", 7, "{:>7.2f}"), ("lag s", 7, "{:>7.2f}"),
           ("wall/ideal", 10, "{:>10.3f}"),
           ("vs gloo", 7, "{:>7}"))


def print_table(rows, out=sys.stdout):
    """One line per run: ``rows`` is ``[(label, figures, or why the run has none)]``."""
    print("  ".join(name.ljust(w) if i == 0 else name.rjust(w)
                    for i, (name, w, _) in enumerate(COLUMNS)), file=out)
    gloo = next((f for label, f in rows if label == "gloo" and isinstance(f, dict)), None)
    for label, fig in rows:
        if not isinstance(fig, dict):
            print(f"{label:<10}  {fig}", file=out)
            continue
        speedup = f"{fig['samples_per_s'] / gloo['samples_per_s']:.2f}x" if gloo else "-"
        values = (label, fig["samples_per_s"], fig["p50_ms"], fig["p99_ms"], 100 * fig["wait_share"],
                  fig["wall_s"], fig["sync_bound_s"], fig["ideal_bound_s"], fig["lag_bound_s"],
                  fig["wall_over_ideal"], speedup)
        print("  ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values)), file=out)


def write_json(path, cfg, main_fig, runs, extra):
    doc = dict(main_fig)
    doc["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    doc["environment"] = environment(cfg)
    doc["runs"] = runs
    doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=float)
