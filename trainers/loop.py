"""Training-loop infrastructure shared by the trainers: logging, curves, checkpoints, progress, `mlpo train`.

- `TrainLogger`: one JSON line per step in `<out>/metrics.jsonl`, TensorBoard scalars in `<out>/tb`,
  and Weights & Biases when `WANDB_PROJECT` is set and `wandb` is importable. `close()` draws the
  reward / accuracy curves to `<out>/curves.png`.
- `Checkpointer`: every N steps writes `<out>/checkpoints/step-000N/` holding the adapter (peft
  format), the optimizer state, the RNG states (python, numpy, torch), the step and the trainer's data
  state (cursor, pool, ...). It is written to a temporary folder and renamed into place, with a
  manifest of sha256 sums written last, so a crash never leaves a half-written checkpoint under a
  real name and a damaged one is detected on load instead of silently resuming from garbage.
  `trainers.run.Run` drives both for every trainer.
- `add_subcommand`: `mlpo train --algo {mlpo,magrpo,malt} ...`, flags mapping one to one onto the
  trainer config dataclass fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .flags import train_flags

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the folder and the fix."""


# ------------------------------------------------------------------------------------------- logging


class TrainLogger:
    """Metrics to JSONL + TensorBoard (+ W&B when `WANDB_PROJECT` is set); curves plotted on close."""

    def __init__(self, out: str | Path, config: dict[str, Any] | None = None, *, resume: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if resume and self.path.exists():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.out / "tb"))
        self.wandb = None
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self.wandb = wandb.init(
                    project=os.environ["WANDB_PROJECT"],
                    name=self.out.name,
                    config=config or {},
                    resume="allow",
                )
        if config is not None:
            (self.out / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def truncate(self, step: int) -> None:
        """Forget rows after `step` (a resumed run replays the steps after its checkpoint)."""
        self.history = [row for row in self.history if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (numbers go to TensorBoard / W&B, everything to JSONL)."""
        row = {"step": step, "time": time.time(), **metrics}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        numbers = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for key, value in numbers.items():
            self.tb.add_scalar(key.replace(".", "/"), value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> Path | None:
        """Flush, and draw the curves; returns the plot path (None when there is nothing to plot)."""
        self.tb.flush()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot_curves(self.history, self.out / "curves.png")


CURVE_KEYS = ("reward/mean", "reward/correct", "eval/team_accuracy", "eval/solo_accuracy")


def plot_curves(
    history: list[dict[str, Any]], path: str | Path, keys: tuple[str, ...] = CURVE_KEYS
) -> Path | None:
    """Reward / accuracy against step (matplotlib, Agg backend); None when no key was logged."""
    present = [k for k in keys if any(k in row for row in history)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in present:
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval") else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> Any:
    """A tqdm bar over steps (None when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint folder holds, after its manifest was verified."""

    folder: Path
    step: int
    state: dict[str, Any]
    """The trainer's own data state (cursor, pools, ...), JSON."""

    @property
    def adapter(self) -> Path:
        """The peft adapter folder."""
        return self.folder / "adapter"

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer `state_dict`."""
        import torch

        return torch.load(self.folder / "optimizer.pt", weights_only=False)

    def rng(self) -> dict[str, Any]:
        """The RNG states saved with it."""
        import torch

        return torch.load(self.folder / "rng.pt", weights_only=False)


class Checkpointer:
    """Writes `<out>/checkpoints/step-NNNNNN` every `every` steps (atomically); finds and verifies the latest."""

    def __init__(self, out: str | Path, every: int = 0, keep: int = 2):
        self.root = Path(out) / "checkpoints"
        self.every = every
        self.keep = keep

    def due(self, step: int, last: bool = False) -> bool:
        """Whether step `step` (1-based, after its update) should be saved."""
        return self.every > 0 and (step % self.every == 0 or last)

    def save(
        self,
        step: int,
        *,
        state: dict[str, Any],
        model: Any = None,
        optimizer: Any = None,
        base_model: str | None = None,
    ) -> Path:
        """Write a complete checkpoint for `step` and return its folder; older ones beyond `keep` are removed.
        Without `model` it holds the state and RNG only (a trainer whose steps save their own adapters)."""
        import torch

        from .lora import save_adapter

        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.root))
        try:
            if model is not None:
                save_adapter(model, tmp / "adapter", base_model=base_model, meta={"step": step})
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, default=str))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: marks completeness
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.complete()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def complete(self) -> list[Path]:
        """Checkpoint folders with a manifest, oldest first (temporary and partial folders are ignored)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())

    def load(self, folder: str | Path) -> Checkpoint:
        """Verify a checkpoint folder against its manifest and read it; raises CheckpointError when damaged."""
        folder = Path(folder)
        others = [p.name for p in self.complete() if p != folder]
        fix = (
            f"move it aside (e.g. `mv {folder} {folder}.bad`) to resume from "
            f"{others[-1] if others else 'the start'}, or start a fresh run in another --out folder"
        )
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            for name, digest in manifest["files"].items():
                path = folder / name
                if not path.is_file():
                    raise CheckpointError(f"{name} is missing")
                if _sha256(path) != digest:
                    raise CheckpointError(f"{name} does not match its checksum")
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError, KeyError, CheckpointError) as e:
            raise CheckpointError(f"checkpoint {folder} is corrupted ({e}); {fix}") from None
        return Checkpoint(folder, int(state.pop("step")), state)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, verified (None when there is none)."""
        found = self.complete()
        return self.load(found[-1]) if found else None


# ------------------------------------------------------------------------------------------- CLI

ALGOS = {
    "mlpo": ("mlpo_agents.trainers.mlpo", "MLPOConfig"),
    "magrpo": ("mlpo_agents.trainers.magrpo", "MAGRPOConfig"),
    "malt": ("mlpo_agents.trainers.malt", "MALTConfig"),
}

COMMON_FLAGS, FLAG_ALGOS = train_flags(
    tuple((algo, module.rsplit(".", 1)[1], config) for algo, (module, config) in ALGOS.items())
)
"""`mlpo train`'s flags, generated from the config dataclasses (`trainers.flags`): field -> (type, help from the
field's docstring), in field order; and the flags only some algorithms take -> those algorithms (every other
flag: all of them). `mlpo train --help` shows it per flag without importing the trainers (torch);
tests/test_docs_friction.py checks it against the config dataclasses. Dicts and tuples: `--set field=value`."""


def _takes(flag: str) -> str:
    algos = FLAG_ALGOS.get(flag)
    return f" [--algo {', '.join(algos)} only]" if algos else ""


def _trainer_module(algo: str) -> Any:
    return importlib.import_module(ALGOS[algo][0])


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace) -> Any:
    """Build the chosen algorithm's config dataclass from parsed flags (unknown fields are clear errors)."""
    module = _trainer_module(args.algo)
    config_cls = getattr(module, ALGOS[args.algo][1])
    names = {f.name for f in dataclasses.fields(config_cls)}
    for flag, algos in FLAG_ALGOS.items():
        given = getattr(args, flag, None)
        if given not in (None, False) and args.algo not in algos and flag not in names:
            raise ValueError(
                f"--{flag.replace('_', '-')} does not apply to --algo {args.algo} (only to {', '.join(algos)}); "
                f"drop it (`mlpo train --help` marks which algorithms take each option; "
                f"{config_cls.__name__}'s own fields are set with --set field=value)"
            )
    values: dict[str, Any] = {}
    for name in COMMON_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use field=value, e.g. --set clip_eps=0.1")
        values[key.replace("-", "_")] = _parse_value(value)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{config_cls.__name__} has no field(s) {unknown}; valid fields: {', '.join(sorted(names))}"
        )
    return config_cls(**values)


def cmd_train(args: argparse.Namespace) -> int:
    """`mlpo train`: build the config, run the trainer, print where the results are."""
    if getattr(args, "recipe", None):
        from .recipe_plan import cmd_train_recipe

        return cmd_train_recipe(args)
    if getattr(args, "dry_run", False):
        raise ValueError("--dry-run checks a GPU recipe: add --recipe NAME (recipes/NAME.yaml) or a recipe path")
    config = config_from_args(args)
    result = _trainer_module(args.algo).train(config)
    summary: dict[str, Any] = getattr(result, "summary", lambda: {"result": str(result)})()
    history = getattr(result, "history", None) if args.algo in ("mlpo", "magrpo") else None  # they log update_skipped
    if history is not None:
        summary["updates"], warning = update_report(history, summary.get("steps", 0), per_role=args.algo == "magrpo")
        if warning:
            print(warning, file=sys.stderr)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def updates_made(history: list[dict[str, Any]], role: str = "") -> int:
    """Optimizer updates a run actually made (of trainee `role` when its metrics are named `<role>/...`):
    logged training steps with a loss and without `update_skipped`."""
    p = f"{role}/" if role else ""
    return sum(1 for row in history if row.get("step", 0) >= 1 and f"{p}loss" in row and not row.get(f"{p}update_skipped"))


def update_report(
    history: list[dict[str, Any]], steps: int, *, per_role: bool = False
) -> tuple[int | dict[str, int], str | None]:
    """The updates a run made (one count; `per_role`: one per trainee, from MAGRPO's `<role>/loss` metrics)
    and a warning when some steps made none: a step whose groups all had equal rewards has no learning signal."""
    roles = sorted({k.removesuffix("/loss") for row in history for k in row if k.endswith("/loss")}) if per_role else []
    counts = {role: updates_made(history, role) for role in roles} if roles else {"": updates_made(history)}
    fewest = min(counts.values())
    updates: int | dict[str, int] = counts if roles else counts[""]
    least = [r for r, n in counts.items() if n == fewest]
    who = f" for {', '.join(least)}" if roles else ""
    if fewest == 0:
        return updates, (
            f"no update was made{who}: every group had equal rewards in each of the {steps} step(s) "
            "(no learning signal), so that adapter is the untrained initial one; record more varied groups "
            "(a larger group size, a higher temperature, easier questions) and train again"
        )
    if fewest < steps:
        return updates, (f"{fewest} of {steps} steps made an update{who}; the others had equal rewards in every "
                         "group (no learning signal)")  # fmt: skip
    return updates, None


def add_subcommand(subparsers: Any) -> None:
    """Add `mlpo train` to the `mlpo` command line."""
    p = subparsers.add_parser(
        "train",
        help="train a team's trainable roles from their traces (MLPO, MAGRPO, MALT)",
        description="Flags map one to one onto the fields of the trainer config (MLPOConfig, MAGRPOConfig, "
        "MALTConfig), with their docstrings as help; dict and tuple fields: --set k=v. A flag marked [--algo ... only] is refused by the other algorithms.",
    )
    p.add_argument("--algo", choices=sorted(ALGOS), default="mlpo", help="training algorithm")
    for name, (kind, text) in COMMON_FLAGS.items():
        flag, help_text = "--" + name.replace("_", "-"), text.replace("%", "%%") + _takes(name)
        if kind is bool:  # --flag / --no-flag; None when neither is given (the config's default)
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any other config field, e.g. --set clip_eps=0.1",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="a GPU recipe (recipes/NAME.yaml or a path): team, servers, trainer config, launch, trace store; "
        "the algorithm comes from it, flags and --set override its trainer fields",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --recipe: validate it on CPU and print the plan (servers, batch shapes, memory estimate)",
    )
    p.set_defaults(func=cmd_train)
