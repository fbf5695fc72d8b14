#!/usr/bin/env python
"""What one copy through the kernel (CMA) costs against a plain memcpy.

blsshm's copy path moves a block in two copies: the sender's into its
record in shared memory, the receiver's out of it.  At 1 MiB per pair that
caps it near 2/3 of the memcpy bandwidth (3 MiB copied per 2 MiB received,
own block included); the zero-copy path, one copy, reaches about 0.93.
Open MPI's shared-memory transport moves large messages in one copy with
``process_vm_readv`` (cross-memory attach, CMA): the receiver reads straight
from the sender's buffer.  This tool measures whether that single copy
would be cheaper here than our two: a child process writes a buffer of
``--size`` bytes and waits; the parent times reading it with
``process_vm_readv`` and, alternating with it, ``np.copyto`` of a buffer of
its own of the same size.  Both buffers stay hot in the caches: the best
case for each.  CMA pins every page of both buffers for each call.

Prints the median of each over ``--rounds`` calls (after a warm-up) and the
ratio of their bandwidths.  Reproduce::

    python tools/single_copy.py --size 1M --rounds 2000
"""
import argparse
import contextlib
import ctypes
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_alltoallv import parse_size  # noqa: E402  (tools/ is not a package)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)


def _read_from(pid, local, remote_address):
    """Copy ``local.nbytes`` bytes at ``remote_address`` in process ``pid`` into ``local``."""
    dst = _IoVec(local.ctypes.data, local.nbytes)
    src = _IoVec(remote_address, local.nbytes)
    got = _libc.process_vm_readv(pid, ctypes.byref(dst), 1, ctypes.byref(src), 1, 0)
    if got != local.nbytes:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv read {got} of {local.nbytes} bytes: {os.strerror(err)}")


def measure(size, rounds):
    """(median ns of a CMA read, median ns of a memcpy) of ``size`` bytes, taking turns ``rounds`` times."""
    source = np.zeros(size, np.uint8)  # the child's copy of it is the one read
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sender: its copy of ``source`` (same address) is what the parent reads
        try:
            os.close(ready_r)
            source[:] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
            os.write(ready_w, b"r")
            signal.pause()  # until the parent kills it
        finally:
            os._exit(0)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.waitpid, pid, 0)
        cleanup.callback(os.kill, pid, signal.SIGKILL)
        cleanup.callback(os.close, ready_r)
        os.close(ready_w)
        if os.read(ready_r, 1) != b"r":
            raise RuntimeError("the sender process failed before its buffer was written")
        received = np.empty(size, np.uint8)
        own = np.ones(size, np.uint8)
        copy = np.empty(size, np.uint8)
        _read_from(pid, received, source.ctypes.data)
        expected = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        if not np.array_equal(received, expected):
            raise RuntimeError("process_vm_readv did not read the sender's bytes")
        clock = time.perf_counter_ns
        cma, memcpy = np.empty(rounds, np.int64), np.empty(rounds, np.int64)
        for i in range(-max(10, rounds // 10), rounds):  # negative: warm-up, not kept
            t0 = clock()
            _read_from(pid, received, source.ctypes.data)
            t1 = clock()
            np.copyto(copy, own)
            t2 = clock()
            if i >= 0:
                cma[i], memcpy[i] = t1 - t0, t2 - t1
        return float(np.median(cma)), float(np.median(memcpy))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 20, help="bytes per copy (default 1M)")
    parser.add_argument("--rounds", type=int, default=2000, help="timed calls of each (default 2000)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    cma, memcpy = measure(args.size, args.rounds)
    print(f"{args.size} bytes, median of {args.rounds}: process_vm_readv {cma / 1e3:.2f} us, "
          f"memcpy {memcpy / 1e3:.2f} us; CMA bandwidth / memcpy bandwidth {memcpy / cma:.2f}")


if __name__ == "__main__":
    main()
