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


TABLE_SOURCE = re.compile(r"<!-- from (docs/results/[\w.]+\.csv) -->\n\n((?:\|.*\n)+)")


def test_the_readme_has_tables_from_generated_results_files():
    assert len(TABLE_SOURCE.findall(README.read_text())) >= 3


@pytest.mark.parametrize("source,table", TABLE_SOURCE.findall(README.read_text()))
def test_every_readme_table_is_its_generated_results_file(source, table):
    """The README's numbers come from a file `evaluate.py` wrote (docs/results/*.csv), not retyped: every row of a
    table marked with its source matches that file's row of the same policy."""
    import csv

    rows = {r["policy"]: r for r in csv.DictReader((README.parent / source).open())}
    dense = rows["dense"]
    lines = [line for line in table.splitlines()[2:]]  # past the header and its rule
    assert len(lines) >= 4
    for line in lines:
        name, top1, gflops, speed = (cell.strip() for cell in line.strip("|").split("|"))
        r = rows[name]
        assert (
            top1
            == f"{100 * float(r['top1']):.2f} [{100 * float(r['top1_low']):.2f}, {100 * float(r['top1_high']):.2f}]"
        )
        assert gflops == f"{float(r['gflops']):.4f}"
        ratios = [float(r[f"img_per_s_{b}"]) / float(dense[f"img_per_s_{b}"]) for b in ("b256", "b1")]
        assert speed == f"{ratios[0]:.2f} / {ratios[1]:.2f}"
