"""Shared checks for dlrm_bench command lines that must be refused."""
from dlrm_bench import cli


def assert_rejected(capsys, argv, *words):
    """``main(argv)`` exits 2 with one line on stderr, ``dlrm_bench: error: ...`` holding
    ``words``, and prints nothing else; returns that line."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dlrm_bench: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
