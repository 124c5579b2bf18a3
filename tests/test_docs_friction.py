"""The friction points a newcomer hit (issue 15), fixed in code: each fails or works as the docs say."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest

from mlpo_agents.cli import main
from mlpo_agents.graphs import build_topology
from tests._commands import ROOT

TOPOLOGY_FILE = '''
from langgraph.graph import END, START, StateGraph

from mlpo_agents.graphs.nodes import agent_node, latest, user
from mlpo_agents.graphs.state import TeamContext, TeamState

ROLES = ("leader",)


def finish(state):
    last = latest(state["turns"], "leader")
    return {"answer": last["answer"] if last else None}


def build_solo(checkpointer=None):
    g = StateGraph(TeamState, context_schema=TeamContext)
    g.add_node("leader", agent_node("leader", lambda state, agent, ctx: user(state["question"])))
    g.add_node("finish", finish)
    g.add_edge(START, "leader")
    g.add_edge("leader", "finish")
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer)


def build_no_checkpointer():
    return build_solo()
'''


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `mlpo argv`, expect exit code 2 and one stderr line; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty working folder holding one topology module, as a newcomer has; no PYTHONPATH."""
    (tmp_path / "my_topology.py").write_text(TOPOLOGY_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("my_topology", None)


def tiny_team(folder, topology: str, params: str = "{}"):
    text = (ROOT / "mlpo_agents/teams/tiny.yaml").read_text()
    text = text.replace("topology: leader_peers", f"topology: {topology}").replace("params: {peers: 2, rounds: 1}",
                                                                                  f"params: {params}")
    (folder / "team.yaml").write_text(text)
    return "team.yaml"


# (1) + (3) ------------------------------------------------------------------------------------------


def test_readme_mixture_of_agents_runs_from_the_repo_root_without_pythonpath(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(ROOT))])
    try:
        argv = ["run", "--team", "examples/mixture_of_agents.yaml", "--task", "arithmetic", "--limit", "1",
                "--traces", str(tmp_path / "t.sqlite")]
        assert main(argv) == 0
    finally:
        sys.modules.pop("examples.mixture_of_agents", None)
        sys.modules.pop("examples", None)


def test_topology_module_in_the_current_folder_is_found(folder):
    graph = build_topology("my_topology:build_solo")
    assert "leader" in graph.get_graph().nodes


def test_topology_that_cannot_be_imported_says_where_it_looked(folder, capsys):
    line = one_error_line(capsys, ["run", "--team", "tiny", "--topology", "no_such_module:build", "--param", "x=1",
                                   "--task", "arithmetic", "--traces", str(folder / "t.sqlite")])
    assert "'no_such_module'" in line and str(folder) in line and "no_such_module.py" in line
    assert "PYTHONPATH" in line
    with pytest.raises(ValueError, match=r"no function 'build_sol'.*builders it defines: build_no_checkpointer, build_solo"):
        build_topology("my_topology:build_sol")


# (5) ------------------------------------------------------------------------------------------------


def test_topology_flag_that_would_drop_the_team_params_is_refused(capsys, tmp_path):
    line = one_error_line(capsys, ["run", "--team", "tiny", "--topology", "debate", "--task", "arithmetic",
                                   "--limit", "1", "--traces", str(tmp_path / "t.sqlite")])
    assert "--topology debate" in line and "'leader_peers'" in line and "peers=2, rounds=1" in line
    assert "--param key=value" in line and "agents=3" in line  # the new topology's parameters
    assert not (tmp_path / "t.sqlite").exists()


def test_topology_flag_with_params_or_without_team_params_runs(folder, capsys):
    argv = ["run", "--team", "tiny", "--topology", "my_topology:build_solo", "--task", "arithmetic",
            "--limit", "1", "--traces", str(folder / "t.sqlite")]
    assert one_error_line(capsys, argv).count("params (peers=2, rounds=1) would be dropped") == 1
    team = tiny_team(folder, "leader_peers")  # no params: nothing to drop
    assert main(["run", "--team", team, "--topology", "my_topology:build_solo", *argv[5:]]) == 0


# checkpointer -----------------------------------------------------------------------------------------


def test_checkpoint_with_a_builder_without_checkpointer_gives_the_fix(folder, capsys):
    team = tiny_team(folder, "my_topology:build_no_checkpointer")
    line = one_error_line(capsys, ["run", "--team", team, "--checkpoint", "--task", "arithmetic", "--limit", "1",
                                   "--traces", str(folder / "t.sqlite")])
    assert "does not accept `checkpointer=`" in line and "checkpointer=None" in line
    assert "graph.compile(checkpointer=checkpointer)" in line and "without --checkpoint" in line
    assert not (folder / "t.sqlite").exists()
    team = tiny_team(folder, "my_topology:build_solo")
    assert main(["run", "--team", team, "--checkpoint", "--task", "arithmetic", "--limit", "1",
                 "--traces", str(folder / "t.sqlite")]) == 0


# (8) ------------------------------------------------------------------------------------------------


def train_parser() -> argparse.ArgumentParser:
    from mlpo_agents.trainers.loop import add_subcommand

    parser = argparse.ArgumentParser(prog="mlpo")
    add_subcommand(parser.add_subparsers(dest="command"))
    return parser


def test_train_help_says_which_algorithms_take_each_option():
    train = train_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    helps = {a.dest: a.help or "" for a in train._actions}
    for flag in ("steps", "group_size", "questions_per_step", "lr"):
        assert helps[flag].endswith("[--algo mlpo, magrpo only]"), helps[flag]
    assert helps["offline"].endswith("[--algo mlpo only]")
    assert "only]" not in helps["team"] + helps["out"] + helps["traces"] + helps["resume"]


def test_flag_algorithms_match_the_config_dataclasses():
    from mlpo_agents.trainers.loop import ALGOS, COMMON_FLAGS, FLAG_ALGOS, _trainer_module

    for algo, (_, config_name) in ALGOS.items():
        config = getattr(_trainer_module(algo), config_name)
        fields = {f.name for f in dataclasses.fields(config)}
        for flag in [*COMMON_FLAGS, "offline", "resume"]:
            takes = algo in FLAG_ALGOS.get(flag, tuple(ALGOS))
            if takes:
                assert flag in fields, f"--{flag} is marked for {algo} but {config_name} has no such field"
            elif flag in fields:  # kept only to refuse it with the reason
                with pytest.raises(ValueError, match=flag):
                    config(**{flag: True})


@pytest.mark.parametrize("flag", [["--steps", "2"], ["--group-size", "2"], ["--lr", "0.1"], ["--offline"]])
def test_an_option_the_algorithm_does_not_take_is_refused_clearly(capsys, flag):
    line = one_error_line(capsys, ["train", "--algo", "malt", *flag])
    assert f"{flag[0]} does not apply to --algo malt" in line and "mlpo train --help" in line


def test_train_flags_are_generated_from_the_config_fields_and_docstrings():
    from mlpo_agents.trainers.flags import config_fields
    from mlpo_agents.trainers.loop import ALGOS, COMMON_FLAGS, _trainer_module

    for algo, (module, config_name) in ALGOS.items():
        config = getattr(_trainer_module(algo), config_name)
        parsed = config_fields(module.rsplit(".", 1)[1], config_name)
        assert [f.name for f in parsed] == [f.name for f in dataclasses.fields(config)], algo
        for f in parsed:
            if f.kind is not None:
                assert f.name in COMMON_FLAGS and f.doc, f"{config_name}.{f.name}: a flag needs a docstring"
    assert COMMON_FLAGS["clip_eps"] == (float, "PPO ratio clipping epsilon")
    assert COMMON_FLAGS["progress"][0] is bool and "task_options" not in COMMON_FLAGS


def test_train_help_does_not_import_torch():
    import subprocess

    code = ("import sys; from mlpo_agents.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--clip-eps" in done.stdout and "--no-progress" in done.stdout and "[--algo malt only]" in done.stdout
