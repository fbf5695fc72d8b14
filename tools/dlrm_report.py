#!/usr/bin/env python
"""The figures of the dlrm_bench report: what bounded lag buys, side by side.

For every model (``default``: dlrm_bench's defaults; ``light``: 8 small
tables, small MLPs, batch 256, where injected delays outweigh compute),
every rank count and with and without delays (``--delay-prob 0.1
--delay-ms 5``), it runs ``python -m dlrm_bench --compare`` (bls lag 0,
bls lag L, gloo, MPI: one after another, same workload and seed), one
configuration after another, never two at once, and prints per
configuration:

- lag L over lag 0 and over gloo (samples/s ratios from the same run);
- lag L's wall time over the ideal bound (the largest per-rank sum of
  compute and delays), over its replay (the same loop from the same
  measured times with a free exchange: what the exchange cost) and over
  the best bound (the larger of the ideal and the capacity bound, which
  counts that ranks share cores when they outnumber them);
- the replay over the ideal bound: what lag L left of the delays;
- the room the bounds leave: synchronous bound over ideal bound;
- lag 0's wall time over its own ideal bound: set against lag L's, it
  compares the two free of the run-to-run swings in compute speed (CPU
  seconds for the same work vary up to 2x between runs on this machine).

With ``--repeat N`` the whole matrix runs N times over (round after round,
so slow phases of the machine hit every configuration alike; round k runs
the backends in dlrm_bench's k-th balanced order, ``--order-offset k``, so
they do not hit one backend either) and each ratio is the median of its N
same-run ratios, with the lowest and highest.

Reproduce (from the repository root, about 10 minutes on 2 idle cores)::

    python tools/dlrm_report.py --json results/dlrm_report.json
    python tools/dlrm_report.py --models light --nprocs 2 --light-num-batches 500   # quick look
    python tools/dlrm_report.py --from-json results/dlrm_report.json   # the table again, nothing run
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

MODELS = {
    "default": [],
    "light": ["--arch-embedding-size", "-".join(["10000"] * 8), "--arch-sparse-feature-size", "16",
              "--arch-mlp-bot", "13-64-16", "--arch-mlp-top", "32-1", "--num-indices-per-lookup", "10",
              "--mini-batch-size", "256"],
}
DELAYS = {"none": [], "0.1x5ms": ["--delay-prob", "0.1", "--delay-ms", "5"]}


def run_one(model, nprocs, delays, opts, round_=0):
    """One ``dlrm_bench --compare`` run; its backends run in the ``round_``-th of
    dlrm_bench's balanced orders, so over ``--repeat`` rounds no backend
    always runs first (after the data is made) or right after the same one."""
    with tempfile.TemporaryDirectory(prefix="dlrm-report-") as tmp:
        out = os.path.join(tmp, "run.json")
        cmd = [sys.executable, "-m", "dlrm_bench", *MODELS[model], *DELAYS[delays], "--nprocs", str(nprocs),
               "--lag", str(opts.lag), "--num-batches", str(opts.num_batches[model]), "--compare",
               "--json", out, "--no-progress", "--order-offset", str(round_)]
        print("$ python " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate()
        finally:  # stopped (Ctrl-C, SIGTERM: see main): the run goes too, before its directory
            if proc.poll() is None:
                proc.terminate()  # dlrm_bench unwinds on it as on Ctrl-C, stopping its ranks
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        sys.stdout.write(stdout[stdout.find("\nrun ") + 1:] if "\nrun " in stdout else stdout)
        if proc.returncode != 0:
            print(stderr, file=sys.stderr)
        # A --compare run whose one backend failed exits 1 but still writes
        # the others' figures.
        if not os.path.exists(out):
            return None
        with open(out) as f:
            return json.load(f)


def ratios(doc, lag):
    runs = {r["label"]: r for r in doc["runs"] if "error" not in r}
    main, lag0, gloo = runs.get(f"bls lag {lag}"), runs.get("bls lag 0"), runs.get("gloo")
    if main is None or lag0 is None:
        return None
    return {
        "lagL_over_lag0": main["samples_per_s"] / lag0["samples_per_s"],
        "lagL_over_gloo": main["samples_per_s"] / gloo["samples_per_s"] if gloo else None,
        "lagL_over_mpi": main["samples_per_s"] / runs["mpi"]["samples_per_s"] if "mpi" in runs else None,
        "wall_over_ideal": main["wall_over_ideal"],
        "wall_over_lag_bound": main["wall_s"] / main["lag_bound_s"],
        "wall_over_replay": main["wall_over_replay"],
        "replay_over_ideal": main["replay_s"] / main["ideal_bound_s"],
        "wall_over_best_bound": main["wall_over_best_bound"],
        "room_sync_over_ideal": main["sync_bound_s"] / main["ideal_bound_s"],
        "lag0_wall_over_sync": lag0["wall_s"] / lag0["sync_bound_s"],
        "lag0_wall_over_ideal": lag0["wall_over_ideal"],
    }


def _exit_on(signum, _frame):
    raise SystemExit(128 + signum)


def _write_json(path, docs):
    """Replace ``path`` with ``docs`` whole (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(docs, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--nprocs", nargs="+", type=int, default=[2, 4])
    p.add_argument("--lag", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=1000, help="per run of the default model (default 1000)")
    p.add_argument("--light-num-batches", type=int, default=2000, help="per run of the light model (default 2000)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over the whole matrix (default 1)")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="print the table of the runs a --json of this tool saved; run nothing")
    opts = p.parse_args(argv)
    if opts.from_json is not None:
        return _table_from_json(opts.from_json)
    for name in ("num_batches", "light_num_batches", "repeat"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.lag < 1 or min(opts.nprocs) < 1:
        p.error("--lag must be at least 1 (it is compared with lag 0) and --nprocs at least 1")
    if opts.json is not None and os.path.isdir(opts.json):
        p.error(f"--json {opts.json}: a directory, not a file")  # else found after the whole matrix
    opts.models = list(dict.fromkeys(opts.models))  # a repeat would run every configuration twice
    opts.nprocs = list(dict.fromkeys(opts.nprocs))
    # SIGTERM and SIGHUP end the report as Ctrl-C does, through the clean-up
    # (the dlrm_bench run, its temporary directory), not around it.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on)
    opts.num_batches = {"default": opts.num_batches, "light": opts.light_num_batches}
    configs = [(m, n, d) for m in opts.models for n in opts.nprocs for d in DELAYS]
    found = {c: [] for c in configs}  # config -> ratios of every round
    docs = []
    for round_ in range(opts.repeat):
        for model, nprocs, delays in configs:
            doc = run_one(model, nprocs, delays, opts, round_)
            r = ratios(doc, opts.lag) if doc is not None else None
            # A run with no JSON is kept too ("run": null): --from-json says it has no figures.
            docs.append({"model": model, "nprocs": nprocs, "delays": delays, "round": round_, "lag": opts.lag,
                         "ratios": r, "run": doc})
            if r is not None:
                found[(model, nprocs, delays)].append(r)
            if opts.json:  # after every run: a matrix stopped part-way keeps what it measured
                _write_json(opts.json, docs)
    return print_table(configs, found, opts.lag, opts.repeat)


def _table_from_json(path):
    """The table of the runs saved by ``--json`` (every round's), ratios recomputed from their figures."""
    try:
        with open(path) as f:
            docs = json.load(f)
        lags = {d["lag"] if "lag" in d else d["run"]["config"]["lag"] for d in docs}
        if len(lags) != 1:
            raise ValueError(f"runs of {len(lags)} lags ({sorted(lags)}): one table takes one")
        lag = lags.pop()
        configs = list(dict.fromkeys((d["model"], d["nprocs"], d["delays"]) for d in docs))
        rounds = 1 + max(d["round"] for d in docs)
        found = {c: [] for c in configs}
        for d in docs:
            r = ratios(d["run"], lag) if d["run"] is not None else None
            if r is not None:
                found[(d["model"], d["nprocs"], d["delays"])].append(r)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"dlrm_report: cannot read {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return print_table(configs, found, lag, rounds)


def print_table(configs, found, L, rounds):
    """One line per configuration at lag ``L``; returns 1 if one has no figures, else 0."""
    # The columns not named after lag 0 are lag L's.
    keys = [("lagL_over_lag0", f"lag{L}/lag0"), ("lagL_over_gloo", f"lag{L}/gloo"), ("lagL_over_mpi", f"lag{L}/mpi"),
            ("wall_over_ideal", f"lag{L} wall/ideal"), ("wall_over_replay", f"lag{L} wall/replay"),
            ("replay_over_ideal", f"lag{L} replay/ideal"),
            ("wall_over_best_bound", f"lag{L} wall/best"), ("lag0_wall_over_ideal", "lag0 wall/ideal"),
            ("room_sync_over_ideal", f"lag{L} sync/ideal")]
    spread = rounds > 1
    widths = [max(len(h), 23 if spread else 6) for _, h in keys]
    if spread:
        print(f"\neach cell: the median over the {rounds} rounds (lowest-highest); n=k: only k rounds gave it")
    print(f"\n{'model':<8} {'P':>2} {'delays':<8} " + " ".join(f"{h:>{w}}" for (_, h), w in zip(keys, widths)))
    for config in configs:
        model, nprocs, delays = config
        line = f"{model:<8} {nprocs:>2} {delays:<8} "
        if not found[config]:
            print(line + "(no figures)")
            continue
        cells = []
        for (key, _), width in zip(keys, widths):
            values = [r[key] for r in found[config] if r[key] is not None]
            if not values:
                cells.append(f"{'-':>{width}}")
            elif spread:
                fewer = f" n={len(values)}" if len(values) < rounds else ""
                cells.append(f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f}){fewer}".rjust(width))
            else:
                cells.append(f"{values[0]:>{width}.2f}")
        print(line + " ".join(cells))
    missing = [config for config in configs if not found[config]]
    if missing:
        print(f"no figures for {len(missing)} of {len(configs)} configurations (see the errors above)",
              file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the clean-up ran on the way out; a traceback would say nothing more
        print("interrupted", file=sys.stderr)
        sys.exit(130)
