"""Every Python block of the README runs as written, each in a fresh interpreter, as a newcomer would paste it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(README.parent), "PATH": "", "OMP_NUM_THREADS": "2", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
