from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

DEFAULT_TIMEOUT: object
MAX_LAG: int
MAX_RANKS: int

Counts = Union[Sequence[int], npt.NDArray[np.integer]]
Timeout = Optional[float]

def layout(nranks: int, lag: int, arena_bytes: int) -> dict: ...
def initialize(segment: Any, nranks: int, lag: int, arena_bytes: int) -> None: ...
def abort_unattached(segment: Any, rank: int, reason: str) -> bool: ...
def describe_abort(abort: Tuple[int, str, int, str]) -> str: ...
def read_abort(segment: Any) -> Optional[Tuple[int, str, int, str]]: ...

class Core:
    rank: int
    size: int
    lag: int
    arena_bytes: int
    next_post: int
    next_complete: int
    timeout: Timeout
    ready: bool
    spin_ns: int
    pause_ns: int
    slice_ns: int
    post_wait_ns: int
    complete_wait_ns: int
    futex_sleeps: int
    cpu_moves: int
    bytes_sent: int
    bytes_received: int
    bytes_streamed: int
    copy_policy: str  # "auto", "cached" or "stream"
    def post(self, t: int, send: Any, send_counts: Counts, *, timeout: Timeout = ...) -> None: ...
    def complete(self, t: int, out: Any = None, *, timeout: Timeout = ...) -> Tuple[Any, npt.NDArray[np.int64]]: ...
    def alltoallv(self, send: Any, send_counts: Counts, out: Any = None, *,
                  timeout: Timeout = ...) -> Tuple[Any, npt.NDArray[np.int64]]: ...
    def arrived(self, t: int) -> bool: ...
    def reset_stats(self) -> None: ...
    def post_views(self, t: int, send_counts: Counts, dtype: npt.DTypeLike = ..., *,
                   timeout: Timeout = ...) -> PostViews: ...
    def complete_views(self, t: int, *, timeout: Timeout = ...) -> CompleteViews: ...

class PostViews:
    def __enter__(self) -> List[npt.NDArray[Any]]: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool: ...

class CompleteViews:
    def __enter__(self) -> List[npt.NDArray[Any]]: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool: ...
