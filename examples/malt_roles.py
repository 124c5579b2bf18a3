"""Each role's own replies in a MALT evaluation, before and after training, read from a run's trace store.

    python examples/malt_roles.py --run runs/malt_learning [--store runs/malt_vote/traces.sqlite]

For every role of the generator -> verifier -> refiner team: the share of its replies (every chain) whose
strict answer is right, the share cut at the token cap and the mean completion tokens
(`trainers.malt_eval.role_outcomes`), for the untrained and the trained evaluation. `malt_learning.py` and
`malt_vote.py` write this table themselves; this script reads it back from any finished run, including
runs made before they did. `--store` reads the evaluation of `malt_vote.py` (its `--out`) instead of the run's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a MALT run folder (examples/malt_learning.py --out)")
    parser.add_argument("--store", type=Path, default=None, help="trace store to read (default: the run's)")
    args = parser.parse_args()
    from examples.malt_vote import run_config_and_team
    from mlpo_agents.trace import TraceStore
    from mlpo_agents.trainers.common import load_split
    from mlpo_agents.trainers.malt_eval import role_outcomes, roles_markdown

    config, team = run_config_and_team(args.run)
    tasks = load_split(config, "test", config.eval_questions)
    store_path = args.store or args.run / "traces.sqlite"
    if not store_path.is_file():
        raise SystemExit(f"no trace store at {store_path}")
    with TraceStore(store_path) as store:
        roles = {label: role_outcomes(store, f"{team.name}-malt-eval-{label}", config.task, tasks)
                 for label in ("before", "after")}  # fmt: skip
    if not roles["before"] or not roles["after"]:
        raise SystemExit(f"{store_path} holds no finished before and after evaluation of team {team.name}")
    print(roles_markdown(roles["before"], roles["after"]))
    print(json.dumps(roles))


if __name__ == "__main__":
    main()
