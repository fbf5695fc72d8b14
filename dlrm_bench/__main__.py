import sys

from dlrm_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
