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

from blsshm import segment
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
    forwarded = {}

    def forward(signum, _frame):
        forwarded["signal"] = signum
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(opts.nprocs):
            env = dict(os.environ, **{ENV_NAME: name, ENV_RANK: str(rank), ENV_SIZE: str(opts.nprocs)})
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent))
        return _supervise(procs, opts.grace)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        segment.unlink(name)
        for s, handler in old.items():
            signal.signal(s, handler)


def _supervise(procs, grace):
    first_failure = None
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if first_failure is None:
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    first_failure = (rank, code)
                    print(f"python -m blsshm.run: rank {rank} failed ({describe_exit(code)})",
                          file=sys.stderr)
                    deadline = time.monotonic() + grace
                    break
        if all(c is not None for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if first_failure is None:
        return 0
    code = first_failure[1]
    return code if code > 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
