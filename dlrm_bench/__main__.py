import signal
import sys

from dlrm_bench.cli import main

if __name__ == "__main__":
    # A scheduler's SIGTERM, or a closed terminal's SIGHUP, ends the run as
    # Ctrl-C does: the backends' cleanup (ranks, segments, mpirun, temporary
    # files) runs on KeyboardInterrupt, and would be skipped on the default action.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    sys.exit(main())
