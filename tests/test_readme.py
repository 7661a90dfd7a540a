"""Every Python block in the README runs as written, and so do its calculator commands."""

import ast
import re
import shlex
from pathlib import Path

import pytest
import torch

from dpclip.cli import main

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
def test_a_readme_python_block_runs_as_written(code, capsys):
    """Each block as a script of its own (a fresh namespace), in this process: no interpreter
    start and torch import per block; the global RNG is left as it was."""
    pytest.importorskip("sklearn")
    with torch.random.fork_rng():
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if "privacy_spent" in code:
        epsilon, delta = ast.literal_eval(out.strip().splitlines()[-1])
        assert 2.9 <= epsilon <= 3.0 and delta == 1e-5
    if "trainer.privacy_engine.epsilon()" in code:
        assert 2.9 <= float(out.strip().splitlines()[-1]) <= 3.0


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_calculator_command_runs_as_written(command, capsys):
    argv = shlex.split(command)  # the entry point itself is run in tests/cli
    assert argv[0] == "dpclip" and main(argv[1:]) in (0, None)
    out = capsys.readouterr().out
    assert "ε" in out or "σ" in out


def test_ci_runs_the_readmes_test_command():
    """The README promises what CI checks: its test command is the one ``.ci/run`` calls."""
    (line,) = [line for line in README.splitlines() if line.endswith("# the test suite")]
    command = line.split("&&", 1)[1].split("#")[0].split()  # e.g. ['pytest', '-n', 'auto']
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text().splitlines()
    assert f"python -m {' '.join(command)}" in ci
