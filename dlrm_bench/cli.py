"""``python -m dlrm_bench``: run, compare, verify and report."""
import os
import sys

import numpy as np

from blsshm._spawn import RemoteTraceback
from blsshm.errors import exception_line
from dlrm_bench import backends, report
from dlrm_bench.config import UsageError, mpi_available, parse
from dlrm_bench.sharding import make_plan


# Compute of the same work this much longer in one run than in another of
# its round is named: the usual spread between runs here is under 1.15x.
COMPUTE_DRIFT = 1.25
MIN_DRIFT_S = 0.5


def planned_runs(cfg, compare):
    """The configurations to run: one, or the --compare set (see ``round_order``)."""
    if not compare:
        return [cfg]
    runs = [cfg.replace(backend="bls", lag=0)]
    if cfg.lag != 0:
        runs.append(cfg.replace(backend="bls"))
    runs.append(cfg.replace(backend="gloo"))
    if mpi_available() is None:
        runs.append(cfg.replace(backend="mpi"))
    return runs


def round_order(runs, k):
    """Round ``k``'s order: row ``k`` of a Williams square, relabelled so round 0 keeps ``runs``' order.

    Over ``n`` rounds (``2n`` for an odd ``n``) every run goes once in
    every place and right after every other run once, so neither a slow
    phase of the machine (CPU seconds for the same work vary up to 2x
    between runs here) nor what a run leaves behind (threads, caches)
    falls on one run more than on another.
    """
    n = len(runs)
    base, lo, hi = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while lo <= hi:
        base.append(lo)
        lo += 1
        if lo <= hi:
            base.append(hi)
            hi -= 1
    place = {b: j for j, b in enumerate(base)}  # relabelling: round 0 is runs as given
    order = [runs[place[(b + k) % n]] for b in base]
    if n % 2 and (k // n) % 2:  # odd n: the mirrored rows balance who follows whom
        order.reverse()
    return order


def median_round(done, label, rounds):
    """``label``'s figures from its median round by samples/s (the lower
    middle one for an even count), or why one of its rounds failed."""
    figs = [fig for name, _, fig in done if name == label]
    for name, k, fig in done:
        if name == label and not isinstance(fig, dict):
            return f"{fig} (round {k + 1})" if rounds > 1 else fig
    figs.sort(key=lambda f: f["samples_per_s"])
    return figs[(len(figs) - 1) // 2]


def paired_ratios(done, main_label, labels):
    """``main_label``'s samples/s over each other run's, paired by round:
    ``{label: {"median", "min", "max", "rounds"}}`` over the rounds where both ran."""
    per_round = {}
    for label, k, fig in done:
        if isinstance(fig, dict):
            per_round.setdefault(k, {})[label] = fig["samples_per_s"]
    ratios = {}
    for label in labels:
        if label == main_label:
            continue
        r = [runs[main_label] / runs[label] for runs in per_round.values() if main_label in runs and label in runs]
        if r:
            ratios[label] = {"median": float(np.median(r)), "min": min(r), "max": max(r), "rounds": len(r)}
    return ratios


def versus_gloo(done, labels):
    """Each run's samples/s over gloo's for the table, paired by round as the ratios are."""
    return {label: paired_ratios(done, label, ["gloo"]).get("gloo") for label in labels}


def compute_drift_notes(done, rounds):
    """Lines saying where the same work's compute took much longer in one run than in another of its round.

    Every run computes the same batches with the same model, so their
    compute should take alike; when it does not (a slower phase of the
    machine, or a backend's own threads taking the cores), samples/s
    ratios carry that.  Compute is the slowest rank's wall seconds in it,
    or, when ranks share cores (and so wait for each other's compute), the
    CPU seconds of all ranks.  Runs of under MIN_DRIFT_S are too short to say.
    """
    by_round = {}
    for label, k, fig in done:
        if isinstance(fig, dict):
            shared = fig["oversubscribed"]
            work = sum(fig["cpu_compute_s_per_rank"]) if shared else max(fig["compute_s_per_rank"])
            by_round.setdefault(k, []).append((work, label))
    notes = []
    n = len({label for label, _, _ in done})
    balanced = n if n % 2 == 0 else 2 * n  # rounds that put every run in every place (round_order)
    for k, runs in sorted(by_round.items()):
        (low, fast), (high, slow) = min(runs), max(runs)
        if high >= MIN_DRIFT_S and low > 0 and high / low > COMPUTE_DRIFT:
            where = f" in round {k + 1}" if rounds > 1 else ""
            notes.append(f"note: the same work's compute took {high / low:.2f}x as long in {slow} as in {fast}"
                         f"{where} (a slower phase of the machine, or the backend's own threads taking "
                         f"the cores): samples/s ratios carry that; wall/ideal, each run against its own "
                         f"compute, does not"
                         + ("" if rounds > 1 else f"; --rounds {balanced} spreads such phases over every run"))
    return notes


def _ratio_text(ratio, label, rounds):
    if rounds == 1:
        return f"{ratio['median']:.2f}x {label}"
    of = f" of {rounds}" if ratio["rounds"] < rounds else ""  # some round failed: the table names it
    if ratio["rounds"] == 1:
        return f"{ratio['median']:.2f}x {label} (1{of} rounds)"
    return f"{ratio['median']:.2f}x {label} ({ratio['min']:.2f}-{ratio['max']:.2f} over {ratio['rounds']}{of} rounds)"


def _bitwise_equal(a, b):
    """Bitwise, as --verify: NaN != NaN would call identical runs different."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _run_name(label, k, rounds):
    return f"{label} round {k + 1}" if rounds > 1 else label


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
    lag = cfg.lag if cfg.backend == "bls" or args.compare else 0  # the largest lag of a run
    if args.verify and cfg.data_batches < min(cfg.num_batches, lag + 2):
        # Iteration t's blocks taken for those of t - k (k <= lag + 1: the
        # iterations in flight at once) give the same predictions when the
        # batches repeat.
        print(f"dlrm_bench: note: --verify sees {cfg.data_batches} distinct batch(es): an iteration "
              f"given the blocks of one up to {lag + 1} before it may go unnoticed; "
              f"--data-size {(lag + 2) * cfg.batch_size} or more makes that visible",
              file=sys.stderr, flush=True)
    _empty_previous_outputs(args)
    runs = planned_runs(cfg, args.compare)
    if args.compare and mpi_available() is not None:
        print(f"  (mpi skipped: {mpi_available()})")
    done = []  # (label, round, figures or why the run has none), in the order they ran
    predictions = {}  # (label, round) -> predictions
    alike = {}  # (label, round) -> (label, 0), whose predictions it repeated bit for bit
    slow_steps = None  # the slow rank's sleeps in the first run, repeated in the others
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f"round {k + 1} of {args.rounds}", flush=True)
        for run_cfg in round_order(runs, args.order_offset + k):
            label = report.run_label(run_cfg.backend, run_cfg.lag)
            if slow_steps is not None:
                run_cfg = run_cfg.replace(slow_steps_s=slow_steps)
            try:
                results = backends.run(run_cfg, label)
            except Exception as exc:  # one failed backend must not hide the others' figures
                bad_data = _bad_data_line(cfg, exc)
                if bad_data is not None:  # every run reads that file: one line, as for bad flags
                    print(f"dlrm_bench: error: {bad_data}", file=sys.stderr)
                    done.append((label, k, f"failed: {bad_data}"))
                    _write_failed_json(args.json, cfg, done, label, [label], args.rounds)
                    return 2
                _print_rank_traceback(label, exc)
                why = f"failed: {exception_line(exc)}"
                done.append((label, k, why))
                if not args.compare:
                    print(f"dlrm_bench: {label} {why}", file=sys.stderr)
                    _write_failed_json(args.json, cfg, done, label, [label], args.rounds)
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
            done.append((label, k, fig))
            p = report.predictions(results)
            first = predictions.get((label, 0))
            if first is not None and _bitwise_equal(p, first):
                alike[label, k] = (label, 0)  # verified as round 1's: one copy kept, however many rounds
            else:
                predictions[label, k] = p
    labels = [report.run_label(r.backend, r.lag) for r in runs]
    rows = [(label, median_round(done, label, args.rounds)) for label in labels]
    figures = {label: fig for label, fig in rows if isinstance(fig, dict)}
    main_label = report.run_label(cfg.backend, cfg.lag)
    failed = [label for label, fig in rows if not isinstance(fig, dict)]
    ratios = paired_ratios(done, main_label, labels)
    if args.compare:
        print()
        if args.rounds > 1:
            print(f"each run's median round of {args.rounds} (by samples/s):")
        report.print_table(rows, versus_gloo(done, labels))
        for line in compute_drift_notes(done, args.rounds):
            print(line)
    if main_label not in figures:
        # The other runs' figures are printed above; keep them in the JSON too.
        print(f"dlrm_bench: {main_label} produced no figures" if args.rounds == 1
              else f"dlrm_bench: {main_label} {dict(rows)[main_label]}", file=sys.stderr)
        _write_failed_json(args.json, cfg, done, main_label, failed, args.rounds)
        return 1
    if args.compare:
        others = [label for label in labels if label != main_label and label in ratios]
        if others:  # every other run that has figures (--backend mpi: both bls runs too)
            fig = figures[main_label]
            lag = cfg.lag if cfg.backend == "bls" else 0  # the bound summarize() computed for this run
            versus = ", ".join(_ratio_text(ratios[k], k, args.rounds) for k in others)
            print(f"{main_label}: {versus}; wall {fig['wall_over_ideal']:.2f}x its ideal bound, "
                  f"{fig['wall_s'] / fig['lag_bound_s']:.2f}x its lag-{lag} bound "
                  f"(the bounds leave {fig['sync_bound_s'] / fig['ideal_bound_s']:.2f}x between "
                  f"synchronous and ideal)")
        first = predictions[main_label, 0]  # it ran in every round (else it has no figures)
        differ = [_run_name(label, k, args.rounds) for (label, k), p in predictions.items()
                  if not _bitwise_equal(p, first)]
        differ += [_run_name(label, k, args.rounds) for (label, k), (_, first_k) in alike.items()
                   if _run_name(label, first_k, args.rounds) in differ]
        print("predictions: " + (f"differ from {main_label} in {', '.join(differ)}" if differ
                                 else f"bitwise identical across the {len(predictions) + len(alike)} runs"))

    status, verified = (1 if failed else 0), None  # a failed --compare run fails the command
    if args.verify:
        from dlrm_bench.verify import compare, reference_predictions
        reference = reference_predictions(cfg)
        verified = {}
        for (label, k), p in predictions.items():
            name = _run_name(label, k, args.rounds)
            mismatches, max_diff, not_finite = compare(p, reference)
            verified[name] = {"mismatches": mismatches, "max_abs_diff": max_diff, "not_finite": not_finite,
                               "predictions": p.size}
            verdict = "bitwise equal" if mismatches == 0 else f"{mismatches} DIFFERENT"
            if not_finite:
                verdict += f", {not_finite} NOT FINITE (NaN or inf: they verify nothing)"
            print(f"verify {name}: {p.size} predictions {verdict} to a single-process "
                  f"recomputation (max abs difference {max_diff:.3g})")
            if mismatches or not_finite:
                status = 1
        for (label, k), (_, first_k) in alike.items():
            verified[_run_name(label, k, args.rounds)] = verified[_run_name(label, first_k, args.rounds)]
        if alike:
            print(f"verify: the later rounds' {len(alike)} runs that repeated their first round's predictions "
                  f"bit for bit have its verdict")
    try:
        if args.save_predictions:
            with open(args.save_predictions, "wb") as f:  # np.save(path) would add ".npy" to the name
                np.save(f, predictions[main_label, 0].reshape(-1))
        if args.json:
            _write_json(args.json, cfg, figures[main_label], done, args.rounds,
                        {"run": main_label, "verify": verified, "failed": failed, "ratios": ratios})
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


def _bad_data_line(cfg, exc):
    """The data file's flag, path and fault if a rank found ``exc`` in it (as ``parse`` words them); else None.

    ``parse`` checks what it reads of the file; the ranks read the rest
    (their tables' values), and a fault they find there is the input's,
    not the run's: no traceback, and no other backend is tried.
    """
    from dlrm_bench.processed import DATA_ERRORS
    if not isinstance(exc, DATA_ERRORS):
        return None
    flag, path = (("--processed-data-file", cfg.processed_data_file) if cfg.processed_data_file is not None
                  else ("--raw-data-file", cfg.raw_data_file))
    said = str(exc)
    return f"{flag} {said}" if said.startswith(f"{path}: ") else f"{flag} {path}: {said}"


def _print_rank_traceback(label, exc):
    """The traceback of the rank that failed, if it came with the exception: where the cause is."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        print(f"dlrm_bench: {label}: the failing rank's traceback:\n{str(cause).rstrip()}",
              file=sys.stderr, flush=True)


def _write_failed_json(path, cfg, done, main_label, failed, rounds):
    """Write a failed run's JSON: no figures of its own, and why.

    The other runs' figures (of --compare) are in its ``runs``.
    """
    if not path:
        return
    try:
        _write_json(path, cfg, {}, done, rounds, {"run": main_label, "failed": failed})
    except OSError as exc:
        print(f"dlrm_bench: could not write {exc.filename}: {exc.strerror}", file=sys.stderr)


def _write_json(path, cfg, main_fig, done, rounds, extra):
    """Every run in the order it ran, each with its round (1, 2, ...)."""
    runs_doc = [{"label": label, "round": k + 1, **fig} if isinstance(fig, dict)
                else {"label": label, "round": k + 1, "error": fig} for label, k, fig in done]
    report.write_json(path, cfg, main_fig, runs_doc, {"rounds": rounds, **extra})
