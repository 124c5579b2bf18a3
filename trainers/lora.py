"""LoRA helpers: attach a peft adapter to a zoo model, save it atomically, load it back.

The adapter folder format (peft + `mlpo_adapter.json`, the base model identity) and its save, metadata and
base-model check live in `mlpo_agents.adapters`; `save_adapter` and `adapter_base_model` are its spellings here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpo_agents import adapters, zoo
from mlpo_agents.adapters import ADAPTER_META_FILE, AdapterMismatchError
from mlpo_agents.packed_linear import private_copy

__all__ = ["ADAPTER_META_FILE", "AdapterMismatchError", "LoraSettings", "attach_lora", "save_adapter",
           "adapter_base_model", "load_adapter"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft `LoraConfig` for a causal LM)."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 keeps training deterministic)."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """Modules to adapt: peft's 'all-linear' (every linear layer but the output head) or module names."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r >= 1 and alpha > 0; got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1); got {self.dropout}")

    def to_peft(self) -> Any:
        """The equivalent `peft.LoraConfig`."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )


def _base_model(base: str | Any, dtype: str) -> tuple[Any, str | None]:
    # A spec gives private modules over the zoo model's weights: zoo.resolve shares one cached model per
    # process and peft wraps modules in place, but the base weights are never written (LoRA only), so
    # they are shared, not copied (a 7B base is not duplicated per trainee). peft freezes them
    # (requires_grad False), which the zoo model sees: nothing trains its base weights.
    if isinstance(base, str):
        model, _ = zoo.resolve(base, dtype=dtype)
        return private_copy(model), zoo.base_model_id(base)
    return base, None


def attach_lora(base: str | Any, settings: LoraSettings | None = None, *, dtype: str = "float32") -> Any:
    """A trainable `PeftModel`: LoRA on zoo spec `base` (private modules, shared weights) or on a given model."""
    from peft import get_peft_model

    model, base_id = _base_model(base, dtype)
    peft_model = get_peft_model(model, (settings or LoraSettings()).to_peft())
    if base_id is not None:
        setattr(peft_model, "mlpo_base_model", base_id)  # noqa: B010 - nn.Module typing
    return peft_model


def save_adapter(
    model: Any,
    folder: str | os.PathLike,
    *,
    base_model: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter of `model` to `folder` in peft format, atomically (`mlpo_agents.adapters.save`)."""
    return adapters.save(model, folder, base_model, meta)


def adapter_base_model(folder: str | os.PathLike) -> str:
    """The base model id an adapter folder was trained on (`mlpo_agents.adapters.base_model_of`)."""
    return adapters.base_model_of(folder)


def load_adapter(
    base: str | Any,
    folder: str | os.PathLike,
    *,
    is_trainable: bool = False,
    dtype: str = "float32",
    base_model: str | None = None,
) -> Any:
    """Load an adapter saved by `save_adapter` onto zoo spec `base` (private modules, shared weights) (or onto a given model).

    Raises `AdapterMismatchError` when the adapter was trained on another base model; with a model
    object instead of a spec, pass `base_model` (its id) to get the same check.
    """
    from peft import PeftModel

    model, base_id = _base_model(base, dtype)
    base_id = base_id or base_model
    trained_on = adapter_base_model(folder)
    if base_id is not None and trained_on != base_id:
        raise AdapterMismatchError(
            f"adapter {folder} was trained on base model {trained_on!r}, not {base_id!r}; load it onto "
            f"{trained_on!r} or train a new adapter for {base_id!r}"
        )
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    setattr(peft_model, "mlpo_base_model", trained_on)  # noqa: B010 - nn.Module typing
    return peft_model
