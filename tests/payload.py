"""Traffic whose every element says where it comes from, where it goes, when and where.

An element is ``src << 56 | dst << 48 | t << 24 | offset``: a lost, duplicated,
reordered or torn element cannot compare equal to what is expected.
"""
import numpy as np

PATTERNS = ("random", "zeros", "huge_pair", "equal")


def counts_matrix(seed, t, size, max_count=64, huge=4096):
    """Per-iteration counts ``C[src, dst]`` all ranks agree on (a function of seed and t)."""
    rng = np.random.default_rng([seed, t])
    pattern = PATTERNS[t % len(PATTERNS)]
    if pattern == "random":
        c = rng.integers(0, max_count + 1, size=(size, size))
        c[rng.random((size, size)) < 0.25] = 0  # irregular: many empty pairs
    elif pattern == "zeros":
        c = np.zeros((size, size), dtype=np.int64)
    elif pattern == "huge_pair":
        c = rng.integers(0, 4, size=(size, size))
        c[rng.integers(size), rng.integers(size)] = huge
    else:
        c = np.full((size, size), rng.integers(1, max_count + 1))
    return c.astype(np.int64)


def block(src, dst, t, count):
    off = np.arange(count, dtype=np.uint64)
    tag = (np.uint64(src) << np.uint64(56)) | (np.uint64(dst) << np.uint64(48)) | (np.uint64(t) << np.uint64(24))
    return off | tag


def send_buffer(src, t, counts_row):
    """What rank ``src`` sends at ``t``: its blocks for every destination, back to back."""
    return np.concatenate([block(src, d, t, int(c)) for d, c in enumerate(counts_row)])


def expected_recv(dst, t, counts_col):
    """What rank ``dst`` must receive at ``t``: every source's block, in rank order."""
    return np.concatenate([block(s, dst, t, int(c)) for s, c in enumerate(counts_col)])
