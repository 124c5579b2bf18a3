"""The LoRA adapters loaded into a LocalEngine, and the forward that applies them row by row.

peft injects LoRA layers into a private copy of the engine's modules that shares the base weights (no second
copy of the model). A forward gets one adapter name per row: every forward of a Llama-family model applies
the rows' updates in `fast_decode.py` (`lora_for` then `fuse_lora`, once per loaded adapter); everything else goes
through peft's mixed-batch forward, where "__base__" rows skip LoRA. Only the engine's worker thread calls
`load`, `unload` and `forward`.
"""

from __future__ import annotations

from typing import Any

import torch

from mlpo_agents.fast_decode import FastDecoder, fuse_lora, lora_for, lora_rows, prefill_mask
from mlpo_agents.packed_linear import private_copy

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""


class EngineLora:
    """Adapters by name over `base_model`, and the forward that runs each row with its own."""

    def __init__(self, base_model: Any, fast: FastDecoder | None) -> None:
        self.base_model, self.fast = base_model, fast
        self.paths: dict[str, str] = {}  # loaded adapter -> its folder
        self.peft_model: Any = None  # None while no adapter is loaded: the clean base model
        # per adapter: its updates for the fast path (None: the fast path cannot apply it)
        self.fast_updates: dict[str, Any] = {}

    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.paths:
            self.peft_model.delete_adapter(name)
            del self.paths[name]
        # peft freezes the base parameters it wraps: their flags are put back (the zoo model shares them).
        flags = [(param, param.requires_grad) for param in self.base_model.parameters()]
        if self.peft_model is None:
            base = private_copy(self.base_model)
            self.peft_model = PeftModel.from_pretrained(base, path, adapter_name=name, is_trainable=False)
            self.peft_model.eval()
        else:
            self.peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        for param, flag in flags:
            param.requires_grad_(flag)
        self.paths[name] = path
        if self.fast is not None:
            self.fast_updates[name] = fuse_lora(lora_for(self.peft_model, name, len(self.fast.layers)), self.fast)

    def unload(self, name: str) -> None:
        del self.paths[name]
        self.fast_updates.pop(name, None)
        if not self.paths:
            self.peft_model = None
            return
        self.peft_model.set_adapter(next(iter(self.paths)))
        self.peft_model.delete_adapter(name)

    def forward(
        self, input_ids, attention_mask, position_ids, cache, adapters: list[str | None]
    ) -> torch.Tensor:
        """One forward, row i under `adapters[i]` (None: the base model); last-position logits (B, V) float32."""
        prefill = attention_mask is None or attention_mask.dim() == 2
        if self.fast is not None and (self.fast.prefills or not prefill):
            lora = lora_rows(adapters, self.fast_updates, input_ids.device)
            if lora is not False:
                if attention_mask is not None and prefill:  # a left-padded prefill
                    attention_mask = prefill_mask(attention_mask)
                return self.fast.step(input_ids, position_ids, attention_mask, cache, lora)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if self.peft_model is None:
            out = self.base_model(**kwargs)
        else:
            lora_model = self.peft_model.base_model
            names = [a if a is not None else BASE_ADAPTER for a in adapters]
            with lora_model._enable_peft_forward_hooks(adapter_names=names):
                out = lora_model.model(**kwargs)
        return out.logits[:, -1, :].float()
