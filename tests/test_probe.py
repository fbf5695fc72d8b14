"""The cache-line probe the benchmark tools print: it measures, and gives up instead of hanging."""
import threading

import numpy as np
import pytest

from blsshm import _probe

pytestmark = pytest.mark.timeout(60)


def test_two_threads_measure_a_round_trip():
    lines = np.zeros(256, np.uint8)
    out = {}

    def side(role):
        out[role] = _probe.pingpong(lines, role, 100, timeout_s=30)

    threads = [threading.Thread(target=side, args=(role,)) for role in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert out[0] > 0 and out[1] == 0
    assert lines.view(np.uint64)[0] == 100 and lines.view(np.uint64)[16] == 100


def test_without_a_partner_it_times_out():
    assert _probe.pingpong(np.zeros(256, np.uint8), 0, 10, timeout_s=0.05) == -1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="256 bytes"):
        _probe.pingpong(np.zeros(64, np.uint8), 0, 1)
    with pytest.raises(ValueError, match="role"):
        _probe.pingpong(np.zeros(256, np.uint8), 2, 1)
