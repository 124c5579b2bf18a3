"""Every command in README.md's ```bash blocks and every ```python block runs as written, on the tiny model, in seconds.

The README is parsed on each run, so edits to it are tested without touching this file. How a usage
synopsis becomes one concrete command on the tiny model is in tests/_commands.py (shared with
tests/test_docs.py, which does the same for the documentation site).
"""

from __future__ import annotations

import re
import shlex

import pytest

from mlpo_agents.cli import main
from tests._commands import DATA, ROOT, SKIP, commands, concrete, on_tiny, skip_reason, split_env

README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """Every command line of every ```bash block of README.md, continuation lines joined, comments dropped."""
    return commands(README.read_text())


COMMANDS = readme_commands()


def test_readme_has_commands_and_the_skip_list_is_used():
    assert any(c.startswith("mlpo run") or " mlpo run" in c for c in COMMANDS)
    used = {prefix for prefix in SKIP for c in COMMANDS if c.startswith(prefix)}
    assert used == set(SKIP), f"drop stale entries from SKIP: {set(SKIP) - used}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workdir, monkeypatch, capsys):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    if DATA.is_dir():
        monkeypatch.setenv("MLPO_DATA_DIR", str(DATA))
    else:
        pytest.skip(f"benchmark data not found at {DATA} (the README's commands read it via MLPO_DATA_DIR)")
    env, words = split_env(shlex.split(command))
    for name, value in env.items():
        if name == "PYTHONPATH":
            monkeypatch.syspath_prepend(str((ROOT / value).resolve()))
        monkeypatch.setenv(name, value)
    assert words[0] == "mlpo", f"README command {command!r} is neither `mlpo ...` nor in SKIP"
    monkeypatch.chdir(ROOT)  # relative paths in the README are relative to the repository root
    argv = on_tiny(concrete(words), workdir)
    code = main(argv)
    assert code == 0, f"`{command}` (run as `mlpo {shlex.join(argv)}`) exited {code}: {capsys.readouterr().err}"


def readme_python_blocks() -> list[str]:
    """Every ```python block of the README."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("source", readme_python_blocks())
def test_readme_python_block_runs(source, tmp_path, monkeypatch):
    """Each Python example runs as a script, in an empty folder (its relative paths land there)."""
    import runpy

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "readme_example.py"
    script.write_text(source)
    runpy.run_path(str(script), run_name="__main__")
