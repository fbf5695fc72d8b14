"""Entry point of one MPI rank: ``mpirun -n P python -m mpi4py -m dlrm_bench.mpi_rank JOB``.

``JOB`` is a pickle written by ``dlrm_bench.backends.run_mpi``; each rank
writes its result beside it as ``rank<r>.pkl``, or the exception that ended it
as ``rank<r>.err`` (its traceback as ``rank<r>.tb``), and rank 0 its progress
to the file the job names (the parent draws the bar: mpirun has our stderr)
and its heartbeat to another (the parent stops a run that stalls).
"""
import os
import pickle
import sys
import traceback

from blsshm._proc import die_with_parent
from blsshm.errors import exception_line
from dlrm_bench.processed import DATA_ERRORS
from dlrm_bench.worker import mpi_rank


def main(job_path):
    die_with_parent(os.getppid())()  # never outlive mpirun's daemon
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.rank
    try:
        result = mpi_rank(job["cfg"], job["label"], job["progress"], job["heartbeat"])
    except BaseException as exc:
        # mpirun's own report of the abort buries the cause: leave it for the parent.
        with open(os.path.join(job["out"], f"rank{rank}.tb"), "w") as f:
            f.write(traceback.format_exc())
        if isinstance(exc, DATA_ERRORS):  # the input's fault: the parent says it as the other backends do
            with open(os.path.join(job["out"], f"rank{rank}.data"), "wb") as f:
                pickle.dump(exc, f)
        with open(os.path.join(job["out"], f"rank{rank}.err"), "w") as f:  # last: its time orders the ranks
            f.write(exception_line(exc))
        raise
    with open(os.path.join(job["out"], f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
