import signal
import sys

from dlrm_bench.cli import main

received = []  # the signal that interrupted the run


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
        raise KeyboardInterrupt


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        status = main()
    except KeyboardInterrupt:  # one line, not the chained tracebacks of every wait it cut short
        signum = received[0] if received else signal.SIGINT  # else a rank's own Ctrl-C came back
        print(f"dlrm_bench: interrupted by {signal.Signals(signum).name}; ranks stopped, "
              f"nothing saved", file=sys.stderr)
        status = 128 + signum  # the shell's convention for a death by that signal
    sys.exit(status)
