"""``python -m blsshm.run -n N [--lag L] [--arena-bytes B] script.py [args]``

Starts N copies of a script (or ``-m module``) as the ranks of one
communicator, like ``torchrun``: each finds its rank through
:func:`blsshm.init`.  If a rank fails, the others get a few seconds to notice
(they raise ``PeerLostError``) before they are killed; the exit status is the
first failing rank's.  The segment is removed in every case.
"""
import argparse
import os
import signal
import subprocess
import sys
import time

from blsshm import _core, segment
from blsshm._proc import describe_exit, die_with_parent
from blsshm.comm import DEFAULT_ARENA_BYTES
from blsshm.errors import BlsError

ENV_NAME, ENV_RANK, ENV_SIZE = "BLSSHM_NAME", "BLSSHM_RANK", "BLSSHM_SIZE"
GRACE_S = 10.0


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m blsshm.run",
        description="Run a program as N ranks of one blsshm communicator.")
    p.add_argument("-n", "--nprocs", type=int, required=True, help="number of ranks")
    p.add_argument("--lag", type=int, default=0, help="lag bound L (default 0: synchronous)")
    p.add_argument("--arena-bytes", type=int, default=DEFAULT_ARENA_BYTES,
                   help=f"room per rank for in-flight records (default {DEFAULT_ARENA_BYTES})")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help="seconds the other ranks get to stop after one fails")
    p.add_argument("-m", dest="module", action="store_true",
                   help="run the target as a module, like python -m")
    p.add_argument("target", help="script path (or module name with -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target")
    return p


def main(argv=None):
    opts = _parser().parse_args(argv)
    if opts.nprocs < 1:
        print("python -m blsshm.run: -n must be at least 1", file=sys.stderr)
        return 2
    if not opts.module and not os.path.exists(opts.target):
        print(f"python -m blsshm.run: no such script: {opts.target}", file=sys.stderr)
        return 2
    try:
        name = segment.create(opts.nprocs, opts.lag, opts.arena_bytes)
    except (BlsError, ValueError) as exc:
        print(f"python -m blsshm.run: {exc}", file=sys.stderr)
        return 2
    cmd = [sys.executable] + (["-m"] if opts.module else []) + [opts.target] + opts.args
    procs = []
    observer = None
    old = {}

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    try:
        # The launcher keeps a mapping (it is no rank) to tell, after a
        # failure, which rank caused it: the first to abort, or the one lost.
        observer = segment.open_mapping(name)
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        for rank in range(opts.nprocs):
            env = dict(os.environ, **{ENV_NAME: name, ENV_RANK: str(rank), ENV_SIZE: str(opts.nprocs)})
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(os.getpid())))
        return _supervise(procs, opts.grace, observer)
    finally:
        if observer is not None:
            observer.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        segment.unlink(name)
        for s, handler in old.items():
            signal.signal(s, handler)


def _supervise(procs, grace, observer):
    """Wait for every rank; after the first failure give the others ``grace`` s.

    Returns 0, or the exit status of the rank that caused the failure: the one
    that aborted the communicator first or that the others found lost, else
    the first that failed.
    """
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace
        if all(c is not None for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.01)
    codes = [p.poll() for p in procs]
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    if not failed:
        return 0
    culprit = failed[0]
    abort = _core.read_abort(observer)
    if abort is not None:
        rank, kind, lost_rank, reason = abort
        suspect = lost_rank if kind == "peer_lost" else rank
        print(f"python -m blsshm.run: rank {rank} aborted the communicator: {reason}", file=sys.stderr)
        if suspect in failed:
            culprit = suspect
    for r in failed:
        print(f"python -m blsshm.run: rank {r} failed ({describe_exit(codes[r])})", file=sys.stderr)
    code = codes[culprit]
    return code if code > 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
