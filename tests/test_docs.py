"""Every code block of the documentation site (docs/*.md) runs, in page order, on the tiny model.

Each page runs in its own temporary folder, which is the working folder and on `sys.path` (what a
reader's shell and `python` see): a ```python block whose first line is `# file: NAME` is saved as
NAME (a module a later command imports, or a script `python NAME` runs); other ```python blocks run
as scripts; ```yaml blocks are saved the same way, or else validated as team files when they are
one; ```bash commands run through `mlpo`'s entry point, pointed at the tiny model with small limits
(tests/_commands.py); ```sql blocks run against the trace store the page's last `mlpo run` wrote;
```text blocks are diagrams and usage lines. The tutorial must end with a trained adapter.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from mlpo_agents.cli import main
from tests._commands import (
    DATA,
    ROOT,
    block_commands,
    concrete,
    fenced_blocks,
    on_tiny,
    skip_reason,
    split_env,
)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LANGUAGES = {"bash", "python", "yaml", "sql", "text"}


def saved_name(body: str) -> str | None:
    """NAME when a block starts with `# file: NAME`."""
    match = re.match(r"# file: (\S+)\n", body)
    return match.group(1) if match else None


class PageRun:
    """The state of one page's run: its folder, the trace store its SQL blocks read, what it ran."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = folder / "runs" / "traces.sqlite"
        self.ran: list[str] = []

    def block(self, language: str, body: str, index: int) -> None:
        name = saved_name(body)
        if name:
            (self.folder / name).write_text(body)
        if language == "bash":
            for command in block_commands(body):
                self.command(command)
        elif language == "python" and not name:
            script = self.folder / f"_block_{index}.py"
            script.write_text(body)
            runpy.run_path(str(script), run_name="__main__")
            self.ran.append(f"python block {index}")
        elif language == "python":
            compile(body, name, "exec")  # a module: imported by a later command
        elif language == "yaml" and not name:
            data = yaml.safe_load(body)
            if isinstance(data, dict) and "model_list" in data:
                from mlpo_agents.config import parse_team

                parse_team(data, f"yaml block {index}")
        elif language == "sql":
            with sqlite3.connect(self.store) as db:
                rows = db.execute(body).fetchall()
            assert rows, f"SQL block {index} returned no rows from {self.store}"
            self.ran.append(f"sql block {index}")

    def command(self, command: str) -> None:
        reason = skip_reason(command)
        if reason:
            self.ran.append(f"skipped {command!r} ({reason})")
            return
        env, words = split_env(shlex.split(command))
        assert not env, f"{command!r}: docs commands take no VAR=value prefix (the folder is on the path)"
        if words[0] == "python" and len(words) == 2:
            runpy.run_path(str(self.folder / words[1]), run_name="__main__")
        else:
            assert words[0] == "mlpo", f"docs command {command!r} is neither `mlpo ...`, `python FILE` nor skipped"
            argv = on_tiny(concrete(words), self.folder, redirect=False)
            if argv[0] == "run":
                self.store = self.folder / (argv[argv.index("--traces") + 1] if "--traces" in argv else "runs/traces.sqlite")
            assert main(argv) == 0, f"`{command}` (run as `mlpo {shlex.join(argv)}`) failed"
        self.ran.append(command)


@pytest.fixture
def page_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # restored after the test, with the cwd `mlpo` appends
    if DATA.is_dir():
        monkeypatch.setenv("MLPO_DATA_DIR", str(DATA))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # the page's own modules (e.g. the tutorial's topology)
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_pages_exist_and_use_known_block_languages():
    assert {p.name for p in PAGES} >= {"index.md", "quickstart.md", "concepts.md", "tutorial.md"}
    for page in PAGES:
        unknown = {lang for lang, _ in fenced_blocks(page.read_text())} - LANGUAGES
        assert not unknown, f"{page.relative_to(ROOT)}: code blocks in {unknown}; use one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_code_block_of_the_page_runs(page, page_folder, capsys):
    run = PageRun(page_folder)
    for index, (language, body) in enumerate(fenced_blocks(page.read_text())):
        run.block(language, body, index)
    if page.name == "tutorial.md":
        ran = " ; ".join(run.ran)
        assert "mlpo run --team critic_team.yaml" in ran and "mlpo train" in ran and "python train_step.py" in ran
        out = capsys.readouterr().out
        assert "trained one step" in out, out[-2000:]
        from safetensors.torch import load_file

        weights = load_file(str(page_folder / "runs/critic-leader-adapter/adapter_model.safetensors"))
        assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "the step changed nothing"


def test_reference_markers_expand_to_every_field():
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))
    from mlpo_agents.config import RoleConfig, Sampling, TeamConfig

    pages = {p.relative_to(DOCS).as_posix(): gen_reference.expand(p.read_text()) for p in PAGES}
    assert not any(gen_reference.MARKER.search(text) for text in pages.values())
    team = pages["reference/team-file.md"]
    for model in (TeamConfig, RoleConfig, Sampling):
        assert all(f"| `{name}` |" in team for name in model.model_fields), model
    assert "`--offline`" in pages["reference/cli.md"] and "## `mlpo train`" in pages["reference/cli.md"]
    assert "`completion_token_ids` | BLOB" in pages["reference/traces.md"]
