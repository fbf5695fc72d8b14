"""``python -m dlrm_bench``: run, compare, verify and report."""
import os
import sys

import numpy as np

from blsshm._spawn import RemoteTraceback
from dlrm_bench import backends, report
from dlrm_bench.config import UsageError, mpi_available, parse
from dlrm_bench.sharding import make_plan


def planned_runs(cfg, compare):
    """The configurations to run: one, or the --compare set in a fixed order."""
    if not compare:
        return [cfg]
    runs = [cfg.replace(backend="bls", lag=0)]
    if cfg.lag != 0:
        runs.append(cfg.replace(backend="bls"))
    runs.append(cfg.replace(backend="gloo"))
    if mpi_available() is None:
        runs.append(cfg.replace(backend="mpi"))
    return runs


def main(argv=None):
    try:
        cfg, args = parse(argv)
    except UsageError as exc:
        print(f"dlrm_bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"dlrm_bench: {report.describe(cfg, make_plan(cfg))}", flush=True)
    if cfg.num_batches < args.num_batches:  # dataset mode: the file has fewer whole batches
        path = cfg.processed_data_file or cfg.raw_data_file
        print(f"dlrm_bench: note: {path} holds {cfg.num_batches} whole batches of {cfg.batch_size}: "
              f"running {cfg.num_batches}, not --num-batches {args.num_batches}", file=sys.stderr, flush=True)
    if args.verify and cfg.data_batches < min(cfg.num_batches, cfg.lag + 2):
        # Iteration t's blocks taken for those of t - k (k <= lag + 1 share
        # the ring's slots) give the same predictions when the batches repeat.
        print(f"dlrm_bench: note: --verify sees {cfg.data_batches} distinct batch(es): an iteration "
              f"given the blocks of one up to {cfg.lag + 1} before it may go unnoticed; "
              f"--data-size {(cfg.lag + 2) * cfg.batch_size} or more makes that visible",
              file=sys.stderr, flush=True)
    _empty_previous_outputs(args)
    runs = planned_runs(cfg, args.compare)
    if args.compare and mpi_available() is not None:
        print(f"  (mpi skipped: {mpi_available()})")
    rows, figures, predictions = [], {}, {}
    slow_steps = None  # the slow rank's sleeps in the first run, repeated in the others
    for run_cfg in runs:
        label = report.run_label(run_cfg.backend, run_cfg.lag)
        if slow_steps is not None:
            run_cfg = run_cfg.replace(slow_steps_s=slow_steps)
        try:
            results = backends.run(run_cfg, label)
        except Exception as exc:  # one failed backend must not hide the others' figures
            _print_rank_traceback(label, exc)
            why = f"failed: {type(exc).__name__}: {exc}"
            rows.append((label, why))
            if not args.compare:
                print(f"dlrm_bench: {label} {why}", file=sys.stderr)
                _write_failed_json(args.json, cfg, rows, label, [label])
                return 1
            print(f"{label}: {why}", flush=True)
            continue
        if args.compare and cfg.slow_rank >= 0 and cfg.slow_factor > 1 and slow_steps is None and len(runs) > 1:
            slow_steps = tuple(float(x) for x in results[cfg.slow_rank]["slow_asked"])
            print(f"  (rank {cfg.slow_rank}'s slow sleeps, {cfg.slow_factor:g} - 1 times its CPU time per "
                  f"step in {label}, are repeated in the runs after it: every backend gets the same)")
        fig = report.summarize(results, run_cfg)
        report.print_run(label, fig, run_cfg.lag if run_cfg.backend == "bls" else 0)
        sys.stdout.flush()
        rows.append((label, fig))
        figures[label] = fig
        predictions[label] = report.predictions(results)
    main_label = report.run_label(cfg.backend, cfg.lag)
    failed = [label for label, fig in rows if not isinstance(fig, dict)]
    if args.compare:
        print()
        report.print_table(rows)
    if main_label not in figures:
        # The other runs' figures are printed above; keep them in the JSON too.
        print(f"dlrm_bench: {main_label} produced no figures", file=sys.stderr)
        _write_failed_json(args.json, cfg, rows, main_label, failed)
        return 1
    if args.compare:
        if main_label != "bls lag 0" and "bls lag 0" in figures:
            fig = figures[main_label]
            lag = cfg.lag if cfg.backend == "bls" else 0  # the bound summarize() computed for this run
            versus = ", ".join(f"{fig['samples_per_s'] / figures[k]['samples_per_s']:.2f}x {k}"
                               for k in ("bls lag 0", "gloo", "mpi") if k in figures and k != main_label)
            print(f"{main_label}: {versus}; wall {fig['wall_over_ideal']:.2f}x its ideal bound, "
                  f"{fig['wall_s'] / fig['lag_bound_s']:.2f}x its lag-{lag} bound "
                  f"(the bounds leave {fig['sync_bound_s'] / fig['ideal_bound_s']:.2f}x between "
                  f"synchronous and ideal)")
        first = predictions[main_label]
        # Bitwise, as --verify: NaN != NaN would call identical runs different.
        differ = [label for label, p in predictions.items()
                  if not np.array_equal(p.view(np.uint32), first.view(np.uint32))]
        print("predictions: " + (f"differ from {main_label} in {', '.join(differ)}" if differ
                                 else f"bitwise identical across the {len(predictions)} runs"))

    status, verified = (1 if failed else 0), None  # a failed --compare run fails the command
    if args.verify:
        from dlrm_bench.verify import compare, reference_predictions
        reference = reference_predictions(cfg)
        verified = {}
        for label, p in predictions.items():
            mismatches, max_diff, not_finite = compare(p, reference)
            verified[label] = {"mismatches": mismatches, "max_abs_diff": max_diff, "not_finite": not_finite,
                               "predictions": p.size}
            verdict = "bitwise equal" if mismatches == 0 else f"{mismatches} DIFFERENT"
            if not_finite:
                verdict += f", {not_finite} NOT FINITE (NaN or inf: they verify nothing)"
            print(f"verify {label}: {p.size} predictions {verdict} to a single-process "
                  f"recomputation (max abs difference {max_diff:.3g})")
            if mismatches or not_finite:
                status = 1
    try:
        if args.save_predictions:
            with open(args.save_predictions, "wb") as f:  # np.save(path) would add ".npy" to the name
                np.save(f, predictions[main_label].reshape(-1))
        if args.json:
            _write_json(args.json, cfg, figures[main_label], rows,
                        {"run": main_label, "verify": verified, "failed": failed})
    except OSError as exc:  # checked before the run, but the file system may have changed since
        print(f"dlrm_bench: could not write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return status


def _empty_previous_outputs(args):
    """Empty the files a previous run left at --json and --save-predictions.

    A run that fails or is interrupted must not leave their figures there
    as if they were its own.  Regular files only (a pipe or a terminal has
    nothing to empty); checked writable already (config).  A failed run
    then writes its JSON (see ``_write_failed_json``); an interrupted one
    leaves the files empty.
    """
    for path in (args.json, args.save_predictions):
        if path is not None and os.path.isfile(path) and os.path.getsize(path) > 0:
            try:
                with open(path, "r+b") as f:
                    f.truncate()
            except OSError:  # said when the run's own figures cannot be written
                pass


def _print_rank_traceback(label, exc):
    """The traceback of the rank that failed, if it came with the exception: where the cause is."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        print(f"dlrm_bench: {label}: the failing rank's traceback:\n{str(cause).rstrip()}",
              file=sys.stderr, flush=True)


def _write_failed_json(path, cfg, rows, main_label, failed):
    """Write a failed run's JSON: no figures of its own, and why.

    The other runs' figures (of --compare) are in its ``runs``.
    """
    if not path:
        return
    try:
        _write_json(path, cfg, {}, rows, {"run": main_label, "failed": failed})
    except OSError as exc:
        print(f"dlrm_bench: could not write {exc.filename}: {exc.strerror}", file=sys.stderr)


def _write_json(path, cfg, main_fig, rows, extra):
    runs_doc = [{"label": label, **fig} if isinstance(fig, dict) else {"label": label, "error": fig}
                for label, fig in rows]
    report.write_json(path, cfg, main_fig, runs_doc, extra)
