import os
import select
import signal
import sys

received = []  # the signal that interrupted the run

# In a background job of a non-interactive shell (`cmd &` or `nohup cmd &` in a
# script), SIGINT starts out ignored, and the ranks inherit that: a Ctrl-C
# passed on to them does nothing.
SIGINT_IGNORED = signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _interrupt(signum, frame):
    """Ctrl-C, a scheduler's SIGTERM or a closed terminal's SIGHUP: unwind as KeyboardInterrupt.

    The backends' cleanup (ranks, segments, mpirun, temporary files) runs
    while the exception unwinds, and the default action would skip it.  Only
    the first signal interrupts: a second one (Ctrl-C pressed twice, or a
    signal sent to the whole process group) must not cut that cleanup short,
    and the cleanup is bounded by the ranks' grace period anyway.
    """
    if not received:
        received.append(signum)
        if signum != signal.SIGINT:
            _interrupt_children()
        raise KeyboardInterrupt


def _interrupt_children():
    """Pass a SIGTERM or SIGHUP sent to us alone on to the ranks as the Ctrl-C a terminal would send them.

    blsshm.spawn gives ranks that run its grace period to act on a Ctrl-C,
    which a terminal sends them too; told nothing, they would compute on
    until it ends.  (multiprocessing's helpers ignore SIGINT; mpirun passes
    it on to its ranks.)  Ranks that ignore SIGINT (``SIGINT_IGNORED``) get
    SIGTERM instead, which ends them at once: with a Ctrl-C they computed
    on for the whole grace period (10 s), as long as ``docker stop`` waits.
    """
    from blsshm._proc import children_of
    signum = signal.SIGTERM if SIGINT_IGNORED else signal.SIGINT
    for pid in children_of(os.getpid()):
        try:
            os.kill(pid, signum)  # not reaped while we run: still our child
        except ProcessLookupError:
            pass


def _stdout_reader_gone():
    """Whether stdout is a pipe whose reader closed it (``| head``): the kernel flags its write end."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or not a file
        return False


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # under nohup, or `cmd &` in a script
            signal.signal(signum, _interrupt)
    try:
        from dlrm_bench.cli import main
        status = main()
    except KeyboardInterrupt:  # one line, not the chained tracebacks of every wait it cut short
        signum = received[0] if received else signal.SIGINT  # else a rank's own Ctrl-C came back
        try:
            print(f"dlrm_bench: interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        except OSError:  # the terminal that sent SIGHUP is gone
            pass
        from blsshm._proc import die_of
        die_of(signum)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # The reader of our output left (`| head -1`): end as a pipeline's
        # writer does, of SIGPIPE, without a traceback.  What was running
        # has been stopped and cleaned up as the error unwound.
        from blsshm._proc import die_of
        die_of(signal.SIGPIPE)
    sys.exit(status)
