"""MALT's data: the value-labelled search tree of each question and the per-role SFT / DPO data built from it.

Pure functions of recorded calls and rewards (no model): `build_tree` links a gvr tree's calls through
`parent_call_id`, `assign_values` runs value iteration from the graded leaves up and labels each output,
`build_datasets` turns positives into SFT examples and (positive, negative) siblings into DPO pairs.
The trainer is `trainers.malt`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from mlpo_agents.trace import ModelCall, Reward

ROLES = ("generator", "verifier", "refiner")
PARENT_ROLE = {"generator": None, "verifier": "generator", "refiner": "verifier"}


# ------------------------------------------------------------------------------------------- credit assignment


@dataclass
class Node:
    """One output in a MALT tree: an answer, a critique or a refinement, with its value and label."""

    call: ModelCall
    children: list[Node] = field(default_factory=list)
    reward: float | None = None
    """The leaf's grade (refinements only; None when it was never graded)."""
    value: float | None = None
    """Set by `assign_values`; None when no graded leaf lies below."""
    positive: bool | None = None
    """value > threshold (None when unvalued)."""

    @property
    def role(self) -> str:
        """The role that wrote this output."""
        return self.call.role


def build_tree(
    calls: Sequence[ModelCall], rewards: Sequence[Reward], reward_name: str = "correct"
) -> list[Node]:
    """Generator answers as roots, their critiques below, the critiques' refinements below those.

    Links come from `ModelCall.parent_call_id`; leaves take the `reward_name` reward recorded for their call.
    Raises ValueError on calls that do not form gvr trees (unknown role, missing or wrong-role parent).
    """
    graded = {r.call_id: r.value for r in rewards if r.name == reward_name and r.call_id is not None}
    nodes = {c.call_id: Node(c, reward=graded.get(c.call_id) if c.role == "refiner" else None) for c in calls}
    roots = []
    for node in nodes.values():
        c = node.call
        if c.role not in PARENT_ROLE:
            raise ValueError(f"call {c.call_id} has role {c.role!r}; MALT trees hold only {ROLES}")
        if PARENT_ROLE[c.role] is None:
            roots.append(node)
            continue
        parent = nodes.get(c.parent_call_id or "")
        if parent is None or parent.role != PARENT_ROLE[c.role]:
            raise ValueError(
                f"{c.role} call {c.call_id} has parent {c.parent_call_id!r}, which is not a {PARENT_ROLE[c.role]} "
                "call of these traces; record trees with build_gvr(tree=True) and pass whole episodes"
            )
        parent.children.append(node)
    return roots


def assign_values(roots: Sequence[Node], threshold: float = 0.5, propagate: str = "mean") -> list[Node]:
    """Value iteration, leaves up: leaf value = reward; parent value = mean over valued children; label value > threshold."""

    def visit(node: Node) -> float | None:
        if node.role == "refiner":
            node.value = node.reward
        else:
            valued = [(v, child) for child in node.children if (v := visit(child)) is not None]
            if propagate == "binarized":
                labels = [1.0 if child.positive else 0.0 for _, child in valued]
                node.value = sum(labels) / len(labels) if labels else None
            else:
                node.value = sum(v for v, _ in valued) / len(valued) if valued else None
        node.positive = None if node.value is None else node.value > threshold
        return node.value

    for root in roots:
        visit(root)
    return list(roots)


def walk(roots: Sequence[Node]) -> Iterator[Node]:
    """Every node, depth first."""
    for root in roots:
        yield root
        yield from walk(root.children)


# ------------------------------------------------------------------------------------------- datasets


@dataclass
class SFTExample:
    """A positive output: its recorded prompt and completion token ids."""

    call_id: str
    role: str
    value: float
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class PreferencePair:
    """Two siblings (same parent, same prompt): a positive (chosen) and a negative (rejected) output."""

    role: str
    parent: str
    """The parent call id (for the generator: `question:<episode id>`)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_value: float
    rejected_value: float
    chosen_call_id: str
    rejected_call_id: str


@dataclass
class RoleData:
    """One role's training data and how it was obtained."""

    sft: list[SFTExample] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("outputs", "positive", "negative", "unvalued", "prompt_mismatch"), 0
        )
    )


def sibling_sets(roots: Sequence[Node]) -> Iterator[tuple[str, list[Node]]]:
    """(parent key, children) for every set of outputs sharing a parent; answers are grouped by question."""
    by_question: dict[str, list[Node]] = {}
    for root in roots:
        by_question.setdefault(f"question:{root.call.episode_id}", []).append(root)
    yield from by_question.items()
    for node in walk(roots):
        if node.children:
            yield node.call.call_id, node.children


def build_datasets(roots: Sequence[Node], max_pairs_per_parent: int | None = None) -> dict[str, RoleData]:
    """Per role: SFT examples from the positives and DPO pairs (positive, negative) of the same parent."""
    data = {role: RoleData() for role in ROLES}
    for node in walk(roots):
        d = data[node.role]
        d.counts["outputs"] += 1
        if node.value is None:
            d.counts["unvalued"] += 1
        elif node.positive:
            d.counts["positive"] += 1
            c = node.call
            d.sft.append(
                SFTExample(
                    c.call_id, c.role, node.value, list(c.prompt_token_ids), list(c.completion_token_ids)
                )
            )
        else:
            d.counts["negative"] += 1
    for parent, siblings in sibling_sets(roots):
        positives = [n for n in siblings if n.positive]
        negatives = [n for n in siblings if n.positive is False]
        pairs = [(p, n) for p, n in itertools.product(positives, negatives) if p.value != n.value]
        for chosen, rejected in pairs[:max_pairs_per_parent]:
            assert chosen.value is not None and rejected.value is not None  # labelled, hence valued
            d = data[chosen.role]
            if chosen.call.prompt_token_ids != rejected.call.prompt_token_ids:
                d.counts["prompt_mismatch"] += 1  # siblings always share a prompt; never pair across prompts
                continue
            d.pairs.append(
                PreferencePair(
                    chosen.role,
                    parent,
                    list(chosen.call.prompt_token_ids),
                    list(chosen.call.completion_token_ids),
                    list(rejected.call.completion_token_ids),
                    chosen.value,
                    rejected.value,
                    chosen.call.call_id,
                    rejected.call.call_id,
                )
            )
    for d in data.values():
        d.counts["sft"], d.counts["pairs"] = len(d.sft), len(d.pairs)
    return data


def merged(data: dict[str, RoleData], roles: Sequence[str]) -> RoleData:
    """The union of several roles' data (the shared-adapter mode)."""
    out = RoleData()
    for role in roles:
        out.sft += data[role].sft
        out.pairs += data[role].pairs
        for key, value in data[role].counts.items():
            out.counts[key] = out.counts.get(key, 0) + value
    return out
