"""Start the ranks of one run on one backend and collect what each returns.

``bls``   ranks from ``blsshm.spawn`` sharing a communicator at ``--lag``;
``gloo``  ranks from ``blsshm.run_ranks``, torch.distributed gloo over
          loopback with a ``file://`` rendezvous;
``mpi``   ``mpirun`` (Open MPI or MPICH) running ``python -m dlrm_bench.mpi_rank``;
          shared memory transport, ranks not bound to cores.
Ranks are started with the "spawn" method: the parent may hold torch's
thread pools, which a forked child must not inherit.
"""
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time

import blsshm
from blsshm._proc import die_with_parent, find_mpirun, mpirun_options, stop_process
from blsshm._spawn import RemoteTraceback
from dlrm_bench import worker
from dlrm_bench.config import MPI_STALL_SLACK_S
from dlrm_bench.sharding import make_plan

STOP_GRACE_S = 10.0


class BackendError(RuntimeError):
    """A backend run that failed; the message says which and why."""


def arena_bytes(cfg):
    """Per-rank arena for lag ``L``: ``L + 2`` of the largest iteration record, with room to spare.

    A byte ring holds ``L + 1`` records in flight plus up to one record of
    wrap-around padding (blsshm's sizing rule).
    """
    plan = make_plan(cfg)
    largest = max(cfg.batch_size * len(ts) * cfg.sparse_size * 4 for ts in plan.tables)
    record = largest + 256 * cfg.nprocs  # block alignment
    return max(1 << 20, (cfg.lag + 2) * record + (1 << 16))


def run_bls(cfg, label, bar):
    return blsshm.spawn(worker.bls_rank, cfg.nprocs, lag=cfg.lag, arena_bytes=arena_bytes(cfg),
                        args=(cfg, label, bar and bar.path), timeout=cfg.timeout_s, start_method="spawn")


def run_gloo(cfg, label, bar):
    with tempfile.TemporaryDirectory(prefix="dlrm-bench-gloo-") as tmp:
        return blsshm.run_ranks(worker.gloo_rank, cfg.nprocs,
                                args=(cfg, os.path.join(tmp, "rdv"), label, bar and bar.path),
                                start_method="spawn")


def mpirun_command(nprocs, job_path):
    mpirun = find_mpirun()
    cmd = [mpirun, "-n", str(nprocs)] + mpirun_options(mpirun)
    # "-m mpi4py" aborts the whole job on an uncaught exception instead of hanging.
    return cmd + [sys.executable, "-m", "mpi4py", "-m", "dlrm_bench.mpi_rank", job_path]


def run_mpi(cfg, label, bar):
    with tempfile.TemporaryDirectory(prefix="dlrm-bench-mpi-") as tmp:
        job_path = os.path.join(tmp, "job.pkl")
        heartbeat = os.path.join(tmp, "heartbeat")
        with open(job_path, "wb") as f:
            pickle.dump({"cfg": cfg, "label": label, "out": tmp, "progress": bar and bar.path,
                         "heartbeat": heartbeat}, f)
        # mpirun's output goes to a file, not a pipe: nothing needs draining
        # while we wait, drawing rank 0's progress (mpirun has its stderr).
        with open(os.path.join(tmp, "mpirun.out"), "w+", errors="replace") as log:
            # If we are killed, mpirun gets SIGTERM, not SIGKILL: it then stops
            # its ranks and removes its session files and shared segments.
            proc = subprocess.Popen(mpirun_command(cfg.nprocs, job_path), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent(os.getpid(), signal.SIGTERM))
            stalled = None
            try:
                _wait_watching(proc, heartbeat, cfg.timeout_s, bar)
            except BackendError as exc:  # said below with what the ranks and mpirun said
                stalled = exc
            finally:
                stop_process(proc, STOP_GRACE_S)
            log.seek(0)
            output = log.read()
        paths = [os.path.join(tmp, f"rank{rank}.pkl") for rank in range(cfg.nprocs)]
        if stalled is not None or proc.returncode != 0 or not all(os.path.exists(p) for p in paths):
            what = str(stalled) if stalled is not None else f"mpirun exited with status {proc.returncode}"
            cause = _first_rank_error(tmp, cfg.nprocs)
            if cause is not None:
                message, tb, data_error = cause
                if data_error is not None:  # as bls and gloo raise it
                    raise data_error from (RemoteTraceback(tb) if tb else None)
                raise BackendError(f"{what}: {message}") from (RemoteTraceback(tb) if tb else None)
            tail = "\n    ".join(output.strip().splitlines()[-8:])
            raise BackendError(f"{what}:\n    {tail}" if tail else what)
        results = []
        for path in paths:
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results


def _wait_watching(proc, heartbeat, timeout_s, bar):
    """Wait for ``proc`` while rank 0 touches ``heartbeat``, drawing ``bar`` (if any) as it goes.

    MPI's collectives have no timeout: a run is stopped once rank 0 has
    shown no sign of progress (starting, finishing its setup, finishing a
    batch) for ``timeout_s`` plus a minute for a batch's own work.  A limit
    on the whole run would stop runs that are merely long (injected delays,
    a slow rank, many batches).
    """
    limit = timeout_s + MPI_STALL_SLACK_S
    deadline = time.monotonic() + limit
    last_beat = None
    while True:
        try:
            proc.wait(timeout=max(0.0, min(worker.PROGRESS_EVERY_S, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            beat = os.stat(heartbeat).st_mtime_ns
        except FileNotFoundError:
            beat = None
        if beat != last_beat:
            last_beat, deadline = beat, time.monotonic() + limit
        elif time.monotonic() >= deadline:
            raise BackendError(f"mpirun stopped: rank 0 showed no progress for {limit:g} s (--timeout "
                               f"{timeout_s:g} s and a minute; MPI's collectives have no timeout)")
        if bar is not None:
            bar.poll()


def _first_rank_error(tmp, nprocs):
    """``rank R raised ...``, its traceback ("" if lost) and its data error (or None: see
    ``mpi_rank``), of the rank whose exception came first.

    The others' follow from it.
    """
    errors = [(os.stat(path).st_mtime_ns, rank, path) for rank in range(nprocs)
              for path in [os.path.join(tmp, f"rank{rank}.err")] if os.path.exists(path)]
    if not errors:
        return None
    _, rank, path = min(errors)
    with open(path) as f:
        message = f"rank {rank} raised {f.read()}"
    data_error = None
    with contextlib.suppress(OSError):
        with open(os.path.join(tmp, f"rank{rank}.data"), "rb") as f:
            data_error = pickle.load(f)
    try:
        with open(os.path.join(tmp, f"rank{rank}.tb")) as f:
            return message, f.read(), data_error
    except OSError:
        return message, "", data_error


def run(cfg, label):
    """Per-rank results (see ``worker.Rank.result``) of ``cfg`` on ``cfg.backend``."""
    runners = {"bls": run_bls, "gloo": run_gloo, "mpi": run_mpi}
    if cfg.backend not in runners:
        raise ValueError(f"unknown backend {cfg.backend!r}")
    if not cfg.progress:
        return runners[cfg.backend](cfg, label, None)
    with tempfile.TemporaryDirectory(prefix="dlrm-bench-progress-") as tmp:
        bar = worker.RelayedProgress(os.path.join(tmp, "progress"), label, cfg.num_batches, cfg.batch_size)
        try:
            return runners[cfg.backend](cfg, label, bar)
        finally:
            bar.close()  # a failure or Ctrl-C is then said on a line of its own
