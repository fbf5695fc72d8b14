"""The exceptions blsshm raises (DESIGN §5).

Every error derives from :class:`BlsError`.  Bad input raises a subclass that
is also a ``ValueError`` or ``TypeError`` *before* anything is published, and
leaves the communicator usable.  A lost or aborting peer raises
:class:`PeerLostError` / :class:`CommAborted` in every rank, at its next post
of an iteration the lost peer never posted, or at a wait for a block that
can no longer come (an iteration whose blocks all arrived still completes);
it takes no new posts after that.
:class:`RankFailedError` is :func:`blsshm.spawn`'s, for a rank that ended
without returning.
"""


def exception_line(exc: BaseException, qualified: bool = False) -> str:
    """``Class: message``, or the class alone when the message is empty (a Ctrl-C's
    KeyboardInterrupt), as a traceback's last line has it; whatever ``__str__`` does.

    ``qualified``: ``module.Class``, for a reader that may not know the class.
    """
    try:
        message = str(exc)
    except Exception as err:  # a broken __str__ must not lose the rest
        message = f"<its str() raised {type(err).__name__}>"
    name = f"{type(exc).__module__}.{type(exc).__qualname__}" if qualified else type(exc).__name__
    return f"{name}: {message}" if message else name


class BlsError(Exception):
    """Base class of every blsshm error."""


class BlsValueError(BlsError, ValueError):
    """An argument has the right type but a wrong value (counts, sizes, order)."""


class BlsTypeError(BlsError, TypeError):
    """An argument has the wrong type (dtype, buffer kind, device)."""


class ArenaFullError(BlsValueError):
    """A record does not fit in this rank's arena; raise ``arena_bytes``."""


class BlsTimeoutError(BlsError, TimeoutError):
    """A wait ran past its timeout.  The communicator stays usable.

    ``iteration`` is the iteration of the call that timed out (the message
    names the call as made, ``alltoallv()`` or ``complete_views(t)``, and
    the iteration it waited for: a ``post(t)`` waits for ranks to complete
    an earlier one), ``waiting_for`` the ranks it waited for, ``operation``
    the phase that waited: ``"post"`` or ``"complete"`` (an ``alltoallv``
    waits in both; in its complete, ``t`` stays posted and ``complete(t)``
    ends it), or ``"attach"`` (the start-up barrier of a first call,
    which waits for ranks, not for an iteration: ``iteration`` is None).
    """

    def __init__(self, message, *, operation=None, iteration=None, waiting_for=()):
        super().__init__(message)
        self.operation = operation
        self.iteration = iteration
        self.waiting_for = tuple(waiting_for)


class CommAborted(BlsError):
    """The communicator was aborted; ``rank`` aborted it first, for ``reason``."""

    def __init__(self, message, *, rank=None, reason=""):
        super().__init__(message)
        self.rank = rank
        self.reason = reason


class PeerLostError(CommAborted):
    """A peer died or closed while others still needed it; ``lost_rank`` names it."""

    def __init__(self, message, *, rank=None, reason="", lost_rank=None):
        super().__init__(message, rank=rank, reason=reason)
        self.lost_rank = lost_rank


class RankFailedError(BlsError):
    """A rank of :func:`blsshm.spawn` ended without a result: killed, exited
    early, or returned a value that cannot be pickled."""

    def __init__(self, message, *, rank=None):
        super().__init__(message)
        self.rank = rank


__all__ = [
    "BlsError", "BlsValueError", "BlsTypeError", "ArenaFullError",
    "BlsTimeoutError", "CommAborted", "PeerLostError", "RankFailedError",
]
