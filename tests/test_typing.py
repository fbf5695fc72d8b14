"""The package ships py.typed: its code and its users' code type-check
against the stubs of the Cython core (blsshm/_core.pyi)."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = '''
import numpy as np
import blsshm

def rank_main(comm: blsshm.Comm) -> float:
    counts = np.ones(comm.size, dtype=np.int64)   # counts may be an array, not only a list
    recv, got = comm.ialltoallv(np.zeros(comm.size), counts).wait()
    comm.post(1, np.zeros(comm.size), counts, timeout=1.0)
    comm.complete(1)
    comm.timeout = None
    return float(comm.stats["iterations_completed"]) + comm.rank + comm.next_post
'''

MISUSE = '''
import blsshm

def misuse(comm: blsshm.Comm) -> None:
    comm.next_post = 3
'''


def _mypy(tmp_path, *targets):
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), *targets],
                          cwd=ROOT, capture_output=True, text=True, timeout=200)


def test_the_package_and_a_user_program_type_check(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    res = _mypy(tmp_path, "blsshm", str(user))
    assert res.returncode == 0, res.stdout + res.stderr


def test_read_only_attributes_are_read_only_to_the_type_checker(tmp_path):
    # The stub declared them plain attributes: mypy passed what raises AttributeError.
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    res = _mypy(tmp_path, str(misuse))
    assert res.returncode == 1 and 'Property "next_post" defined in "Core" is read-only' in res.stdout, res.stdout
