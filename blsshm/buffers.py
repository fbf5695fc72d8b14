"""Send buffers that other ranks read fastest: arrays on transparent huge pages.

A block of ``direct_min_bytes`` or more is read by its receiver straight out
of the sender's buffer, with one ``process_vm_readv`` (the kernel's
cross-memory attach).  For each call the kernel looks up and pins every
page of the sender's it copies from.  On 2 MiB pages there are 512 times
fewer than on 4 KiB ones: here a 1 MiB read took 0.8 of the time
(``python tools/single_copy.py --size 1M`` against the same with
``--huge-pages``); Open MPI's CMA reads of such buffers gain too.
"""
import math
import mmap
import operator
import sys
from typing import Any, Sequence, Union

import numpy as np

from blsshm.errors import BlsTypeError, BlsValueError

_THP_SIZE_FILE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


def _huge_page_bytes():
    """The kernel's transparent huge page size (2 MiB on x86-64), or 0 without THP."""
    try:
        with open(_THP_SIZE_FILE) as f:
            size = int(f.read())
    except (OSError, ValueError):
        return 0
    return size if size > mmap.PAGESIZE and size & (size - 1) == 0 else 0


#: Bytes in a transparent huge page here; 0 where the kernel has none.
HUGE_PAGE_BYTES = _huge_page_bytes()


def empty(shape: Union[int, Sequence[int]], dtype: Any = float) -> Any:
    """A new, zero-filled C-contiguous array placed on transparent huge pages where it pays.

    Use it for send buffers of large blocks: another rank reads a block of
    ``direct_min_bytes`` or more straight out of it, and reads from huge
    pages are faster (module docstring).  ``shape`` and ``dtype`` are as
    for ``numpy.empty``.  An array of half a huge page (1 MiB) or more gets
    its own private mapping, aligned to a huge page and advised
    ``MADV_HUGEPAGE``: it takes whole huge pages of memory as it is
    touched.  A smaller one, or one on a kernel without transparent huge
    pages, is an ordinary numpy array.  A torch dtype (``torch.float32``,
    ``torch.bfloat16``) gives a CPU tensor on the same memory.  The memory
    is freed with the array (or tensor) and its views.  Allocate it in the
    rank that sends from it: a forked rank's first write to memory it
    inherited copies that memory to ordinary pages.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return _tensor(torch, shape, dtype)
    dtype = np.dtype(dtype)
    if dtype.hasobject:  # zeroed memory is not a valid object pointer
        raise BlsTypeError(f"blsshm.empty() holds plain data; dtype {dtype} holds Python objects")
    try:
        dims = tuple(operator.index(d) for d in shape) if np.iterable(shape) else (operator.index(shape),)
    except TypeError:
        raise BlsTypeError(f"shape must be an integer or a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise BlsValueError(f"shape {dims} has a negative dimension")
    nbytes = math.prod(dims) * dtype.itemsize
    huge = HUGE_PAGE_BYTES
    if not huge or nbytes < huge // 2:
        return np.zeros(dims, dtype)
    advised = -(-nbytes // huge) * huge  # whole huge pages, so the last one is advised too
    # One huge page more than needed, to start on a huge page boundary
    # wherever the kernel puts the mapping; the slack is never touched, so
    # it takes address space, not memory.
    try:
        mapping = mmap.mmap(-1, advised + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OverflowError, OSError) as exc:  # as numpy says it
        raise MemoryError(f"blsshm.empty() cannot map {nbytes} bytes for shape {dims}: {exc}") from None
    start = np.frombuffer(mapping, np.uint8, count=0).ctypes.data
    offset = -start % huge
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, advised)
    except OSError:  # THP built but turned off for madvise: ordinary pages, same array
        pass
    # The array keeps ``mapping`` alive (its base); the mapping is unmapped with the last view.
    return np.ndarray(dims, dtype, buffer=mapping, offset=offset)


def _tensor(torch, shape, dtype):
    """:func:`empty` for a torch dtype: its bytes, viewed as ``dtype`` (numpy has no bfloat16)."""
    raw = empty(shape, np.dtype((np.void, dtype.itemsize)))  # checks shape
    flat = torch.from_numpy(raw.reshape(-1).view(np.uint8)).view(dtype)
    return flat.reshape(raw.shape)
