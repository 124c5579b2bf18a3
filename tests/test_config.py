"""Team config validation: errors name the file, the key and the fix."""

from __future__ import annotations

import pytest

from mlpo_agents.config import ConfigError, default_team, load_team
from mlpo_agents.graphs import check_topology

GOOD = """
name: t
topology: leader_peers
params: {peers: 2}
model_list:
  - model_name: m
    litellm_params: {model: local/tiny-test}
roles:
  leader: {model: m, trainable: true, sampling: {temperature: 0.5, n: 4}}
  peer: {model: m}
"""


def write(tmp_path, text):
    path = tmp_path / "team.yaml"
    path.write_text(text)
    return path


def test_valid_yaml_loads(tmp_path):
    team = load_team(write(tmp_path, GOOD))
    assert team.role("peer-7").model == "m" and team.role("leader").sampling.n == 4
    assert team.trainable_roles() == ["leader"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (GOOD.replace("model: m, trainable", "model: nope, trainable"), "roles.leader.model is 'nope'"),
        (GOOD.replace("temperature: 0.5", "temperature: -1"), "roles.leader.sampling.temperature"),
        (GOOD.replace("n: 4", "n: 0"), "roles.leader.sampling.n"),
        (GOOD.replace("trainable: true", "trainable: true, colour: red"), "roles.leader.colour"),
        (GOOD.replace("litellm_params: {model: local/tiny-test}", "litellm_params: {}"), "model_list[0]"),
        (GOOD + "  leader: [", "not valid YAML"),
        ("- just a list", "expected a mapping"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, bad, needle):
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as err:
        load_team(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_unknown_role_lists_known_roles(tmp_path):
    team = load_team(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match="no role 'judge'.*roles: leader, peer"):
        team.role("judge")


def test_builtin_teams_load():
    for name in ("default", "solo", "tiny", "vllm"):
        assert load_team(name).name == name
    assert default_team().params["peers"] == 3


def test_every_builtin_team_has_the_roles_its_topology_calls():
    from pathlib import Path

    import mlpo_agents.config

    for path in sorted((Path(mlpo_agents.config.__file__).parent / "teams").glob("*.yaml")):
        check_topology(load_team(path))


def test_check_topology_names_missing_roles_and_bad_params():
    tiny = load_team("tiny")
    with pytest.raises(ConfigError, match=r"no role 'generator', 'verifier', 'refiner'.*add `roles: \{generator"):
        check_topology(tiny.model_copy(update={"topology": "gvr", "params": {}}))
    with pytest.raises(ConfigError, match=r"no role 'judge'"):
        check_topology(load_team("tiny_debate").with_overrides(judge=True))
    check_topology(load_team("solo"))  # peers=0: no peer role needed
    with pytest.raises(ConfigError, match=r"rounds='two' is not a valid int; pass e.g. --param rounds=1"):
        check_topology(tiny.with_overrides(rounds="two"))
