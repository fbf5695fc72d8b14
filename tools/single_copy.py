#!/usr/bin/env python
"""What one copy through the kernel (CMA) costs against a plain memcpy.

blsshm's copy path moves a block in two copies: the sender's into its
record in shared memory, the receiver's out of it.  With P ranks that caps
it near P / (2P - 1) of the memcpy bandwidth (each rank copies 2P - 1
blocks per P it receives, its own block copied once): 2/3 at P = 2.  The
zero-copy path, one copy, reaches about 0.93 at 1 MiB per pair.
Open MPI's shared-memory transport moves large messages in one copy with
``process_vm_readv`` (cross-memory attach, CMA): the receiver reads straight
from the sender's buffer.  This tool measures whether that single copy
would be cheaper here than our two: a child process writes a buffer of
``--size`` bytes and waits; the parent times reading it with
``process_vm_readv`` and, alternating with it, ``np.copyto`` of a buffer of
its own of the same size.  Both sources are written once, before the
timing.  CMA pins the sender's pages, a chunk at a time, for each call.
This times the copy alone: a single-copy alltoallv would also have to
publish the sender's address and make the sender wait until every
receiver has read its block.

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
import traceback

import numpy as np

import blsshm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_alltoallv import parse_size  # noqa: E402  (tools/ is not a package)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                              ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
#: The most one call moves (the kernel's MAX_RW_COUNT); larger sizes are refused, not split.
MAX_SIZE = 0x7FFFF000


def _reader(pid, local, remote_address):
    """A call that copies ``local.nbytes`` bytes at ``remote_address`` in process ``pid`` into ``local``.

    Everything but the system call is done here, once, so that the timed
    call costs what the kernel's copy does, as ``np.copyto`` costs a memcpy.
    """
    dst = _IoVec(local.ctypes.data, local.nbytes)
    src = _IoVec(remote_address, local.nbytes)
    args = (pid, ctypes.byref(dst), 1, ctypes.byref(src), 1, 0)
    nbytes = local.nbytes

    def read():
        got = _process_vm_readv(*args)
        if got != nbytes:
            err = ctypes.get_errno() if got < 0 else 0
            raise OSError(err, f"process_vm_readv read {got} of {nbytes} bytes"
                               + (f": {os.strerror(err)}" if err else ""))
    read.keep = (dst, src)  # the iovecs live as long as the call
    return read


def measure(size, rounds, allocate=np.zeros):
    """(median ns of a CMA read, median ns of a memcpy) of ``size`` bytes, taking turns ``rounds`` times.

    Every buffer, the sender's too, comes from ``allocate(size, np.uint8)``.
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sender: allocates after the fork, so its pages are its own, not shared copy-on-write
        try:
            os.close(ready_r)
            source = allocate(size, np.uint8)
            source[:] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
            os.write(ready_w, source.ctypes.data.to_bytes(8, "little"))
            signal.pause()  # until the parent kills it
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.waitpid, pid, 0)
        cleanup.callback(os.kill, pid, signal.SIGKILL)
        cleanup.callback(os.close, ready_r)
        os.close(ready_w)
        address = os.read(ready_r, 8)
        if len(address) != 8:
            raise RuntimeError("the sender process failed before its buffer was written")
        received = allocate(size, np.uint8)
        own = allocate(size, np.uint8)
        own.fill(1)
        copy = allocate(size, np.uint8)
        read = _reader(pid, received, int.from_bytes(address, "little"))
        read()
        expected = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        if not np.array_equal(received, expected):
            raise RuntimeError("process_vm_readv did not read the sender's bytes")
        clock = time.perf_counter_ns
        cma, memcpy = np.empty(rounds, np.int64), np.empty(rounds, np.int64)
        for i in range(-max(10, rounds // 10), rounds):  # negative: warm-up, not kept
            t0 = clock()
            read()
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
    parser.add_argument("--huge-pages", action="store_true",
                        help="every buffer from blsshm.empty (transparent huge pages) instead of numpy")
    args = parser.parse_args(argv)
    if args.size > MAX_SIZE:
        parser.error(f"--size must be at most {MAX_SIZE} bytes (one process_vm_readv call), got {args.size}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    allocate = blsshm.empty if args.huge_pages else np.zeros
    cma, memcpy = measure(args.size, args.rounds, allocate)
    pages = "blsshm.empty (huge pages)" if args.huge_pages else "numpy"
    print(f"{args.size} bytes in {pages} buffers, median of {args.rounds}: process_vm_readv {cma / 1e3:.2f} us, "
          f"memcpy {memcpy / 1e3:.2f} us; CMA bandwidth / memcpy bandwidth {memcpy / cma:.2f}")


if __name__ == "__main__":
    main()
