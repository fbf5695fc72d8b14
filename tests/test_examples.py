"""The code users copy first runs as shown: README's example and examples/pipeline.py."""
import ast
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_example():
    """The Python block of README's "Use it in your own multi-process code" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it in your own multi-process code", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's custom-code section should hold exactly one Python example"
    return blocks[0]


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=100,
                          cwd=cwd)


def test_readme_example_runs_as_a_script(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(readme_example())
    res = _run([str(script)], tmp_path)
    assert res.returncode == 0, res.stderr
    stats = ast.literal_eval(res.stdout.strip())  # it prints rank 0's comm.stats
    assert stats["iterations_posted"] == stats["iterations_completed"] == 1000
    assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0


@pytest.mark.parametrize("lag", [0, 3])
def test_pipeline_example_runs_under_the_launcher(tmp_path, lag):
    res = _run(["-m", "blsshm.run", "-n", "3", "--lag", str(lag), str(ROOT / "examples" / "pipeline.py"),
                "--iters", "200", "--compute-ms", "0.05", "--delay-ms", "0.5"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"3 ranks, lag {lag}, 200 iterations" in res.stdout
    assert "synchronous bound" in res.stdout
