"""Every Python block in the README runs as written, and so do its calculator commands."""

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
COMMANDS = [
    line.split("  #")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for line in block.splitlines()
    if line.startswith(("dpclip epsilon", "dpclip noise"))
]


def test_the_readme_has_a_quickstart_and_calculator_commands():
    assert PYTHON_BLOCKS and len(COMMANDS) == 2


@pytest.mark.slow
@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.splitlines()[-1][:40])
def test_a_readme_python_block_runs_as_written(code):
    pytest.importorskip("sklearn")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if "privacy_spent" in code:
        epsilon, delta = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
        assert 2.9 <= epsilon <= 3.0 and delta == 1e-5


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_calculator_command_runs_as_written(command):
    argv = shlex.split(command)
    proc = subprocess.run(
        [sys.executable, "-m", "dpclip.cli", *argv[1:]], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "ε" in proc.stdout or "σ" in proc.stdout
