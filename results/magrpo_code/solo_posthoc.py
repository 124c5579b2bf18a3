"""Re-measure MAGRPO's `solo` rows of a run folder (the answering agent alone, before = base, after = its
final adapter) with the current code, exactly as trainers.magrpo_eval.evaluate_alone does, and pair them
per question with the team outcomes recorded in the run's eval_traces.sqlite."""
import json
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

from mlpo_agents.config import load_team
from mlpo_agents.report import paired_row
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.common import load_split
from mlpo_agents.trainers.magrpo import MAGRPOConfig
from mlpo_agents.trainers.magrpo_eval import evaluate_alone, outcomes
from mlpo_agents.trainers.run import EVAL_STEP, step_seed

run = Path(sys.argv[1])
cfg = json.loads((run / "config.json").read_text())
cfg["resume"] = False
config = MAGRPOConfig(**{k: v for k, v in cfg.items() if k in MAGRPOConfig.__dataclass_fields__})
team = load_team(config.team)
tasks = load_split(config, "test", config.eval_questions)
seed = step_seed(config.seed, EVAL_STEP)
adapter = run / "adapters" / config.answer_role / "step-9"
solo = {}
prev = sqlite3.connect(run / "posthoc_solo_traces.sqlite")
solo["before"] = dict(prev.execute("select e.task_id, r.value from episodes e join rewards r using(episode_id) where e.team like '%posthoc-before' and r.name='correct' and r.call_id is null").fetchall())
prev.close()
store = TraceStore(run / "posthoc_solo_traces.sqlite")
for label, folder in (("after", adapter),):
    agent = SimpleNamespace(role=config.answer_role, folder=folder, version=f"{config.answer_role}-posthoc-{label}")
    summary = evaluate_alone(agent, team, tasks, store, config, label=f"posthoc-{label}", seed=seed)
    solo[label] = outcomes("solo", summary)["solo_correct"]
    print(label, summary.accuracy, flush=True)
store.close()
db = sqlite3.connect(run / "eval_traces.sqlite")
team_out = {}
for label in ("before", "after"):
    rows = db.execute(
        "select e.task_id, r.value from episodes e join rewards r using(episode_id) "
        "where e.team = ? and r.name = 'correct' and r.call_id is null", (f"{team.name}-{label}",)).fetchall()
    team_out[label] = dict(rows)
out = {
    "team": paired_row(team_out["before"], team_out["after"]),
    f"{config.answer_role} alone": paired_row(solo["before"], solo["after"]),
    f"trained team vs untrained {config.answer_role} alone": paired_row(solo["before"], team_out["after"]),
    "untrained team vs untrained alone": paired_row(solo["before"], team_out["before"]),
}
(run / "posthoc_solo.json").write_text(json.dumps({"solo": solo, "team": team_out, "rows": out}, indent=1))
for k, v in out.items():
    print(k, {x: v[x] for x in v if x in ("n", "before", "after", "gained", "lost", "p_value", "before_ci", "after_ci")})
