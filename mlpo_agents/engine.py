"""In-process batched generation engine (transformers) behind the litellm provider ``local/``.

``LocalEngine`` owns one model on a background daemon thread. Requests queue up; the worker runs
*continuous batching*: between two decode steps it prefills newly arrived prompts together (a few
left-padded forwards, one row per distinct prompt and adapter: the ``n`` samples of a request and identical
prompts share it; ``prefill.py``), writes their KV caches into the running batch's spare rows (left
padding + a boolean mask + per-row positions) and keeps decoding. Finished rows leave at once (the last
rows take their places), all-padding columns are trimmed; a prompt whose prefill fails fails alone.

Logprobs convention: ``logprobs[t]`` is the log-probability of the sampled token under the *raw model*
distribution, ``log_softmax(logits)`` at temperature 1, before temperature / top-p are applied. This is
what vLLM returns by default (``logprobs_mode="raw_logprobs"``) and what a fresh forward pass over
prompt + completion reproduces, which is how trainers use them. Pass ``logprobs_mode="processed"`` to
get logprobs under the temperature-scaled distribution instead (top-p truncation is never included).

The litellm provider ``local/<spec>[@<adapter>]`` is in ``providers.py``; the batch's KV cache in ``kv_cache.py``;
forwards (prefill and decode) of Llama-family models in ``fast_decode.py``, of others through transformers' modules.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mlpo_agents import zoo
from mlpo_agents.engine_lora import BASE_ADAPTER, EngineLora
from mlpo_agents.fast_decode import FastDecoder
from mlpo_agents.kv_cache import append_cache_rows, concat_caches, fill_order, keep_cache_rows, left_pad_mask
from mlpo_agents.omp_pools import release_idle_pool
from mlpo_agents.packed_linear import engine_model
from mlpo_agents.prefill import PrefilledBlock, WavePrompt, prefill_wave
from mlpo_agents.sampling import GenerationResult, Sample, SamplingParams, sample_tokens

__all__ = ["GenerationResult", "LocalEngine", "Sample", "SamplingParams"]


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    future: concurrent.futures.Future
    submitted: float = field(default_factory=time.perf_counter)
    samples: list[Sample | None] = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Row:
    request: _Request
    index: int
    generator: torch.Generator
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class LocalEngine:
    """Continuous-batching generation on one in-process model; thread-safe, sync and async entry points."""

    def __init__(
        self,
        spec: str,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 64,
        logprobs_mode: str = "raw",
        share_weights: bool = True,
        num_threads: int | None = None,
    ) -> None:
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError("logprobs_mode must be 'raw' or 'processed'")
        self.spec = zoo.canonical_spec(spec)
        self.base_model_id = zoo.base_model_id(spec)
        self.dtype = zoo.torch_dtype(dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_size = max_batch_size
        self.logprobs_mode = logprobs_mode
        model, self.tokenizer = zoo.resolve(spec, dtype=self.dtype)
        self._base_model, self.packed_linears = engine_model(model, self.device, share_weights)
        self._lora = EngineLora(
            self._base_model, FastDecoder.build(self._base_model, self.packed_linears > 0)
        )
        # Intra-op threads of the worker thread only (a per-thread setting). Tiny models gain nothing from
        # threads and suffer badly on a busy machine, so they default to one.
        env_threads = os.environ.get("MLPO_ENGINE_THREADS")
        if num_threads is None and env_threads:
            num_threads = int(env_threads)
        if num_threads is None and self._base_model.num_parameters() < 10_000_000:
            num_threads = 1
        self.num_threads = num_threads
        self.adapters = self._lora.paths  # loaded adapter -> its folder (read-only outside the worker)
        eos = self._base_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_ids)
        self.max_positions = int(getattr(self._base_model.config, "max_position_embeddings", 1 << 30))
        self._use_bool_mask = self._base_model.config._attn_implementation in ("sdpa", "flash_attention_2")
        self.stats = {"prefill_forwards": 0, "prefill_tokens": 0}  # prefill work so far (real tokens)
        self._queue: queue.Queue = queue.Queue()
        self._commands: list[tuple[str, tuple, concurrent.futures.Future]] = []
        self._commands_lock = threading.Lock()
        self._closed = False
        self._reset_batch()
        self._thread = threading.Thread(target=self._worker, name=f"LocalEngine[{self.spec}]", daemon=True)
        self._thread.start()
        _live_engines.add(self)
        release_idle_pool()  # this thread's OpenMP threads (a bf16 conversion's) would slow the worker's

    # ------------------------------------------------------------------------------------------- public API

    def encode_messages(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Chat messages -> prompt token ids through the tokenizer's chat template (generation prompt added)."""
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def submit(
        self,
        messages: Sequence[dict[str, Any]] | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        **sampling: Any,
    ) -> concurrent.futures.Future:
        """Queue a request (chat messages or prompt token ids); returns a Future of ``GenerationResult``."""
        if self._closed:
            raise RuntimeError("LocalEngine is closed")
        if (messages is None) == (prompt_token_ids is None):
            raise ValueError("Pass exactly one of messages or prompt_token_ids")
        params = params or SamplingParams(**sampling)
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.encode_messages(messages or [])
        if not ids:
            raise ValueError("Empty prompt")
        if len(ids) >= self.max_positions:
            raise ValueError(f"Prompt of {len(ids)} tokens does not fit in {self.max_positions} positions")
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.max_batch_size}")
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(
                f"Adapter {adapter!r} is not loaded; call engine.load_adapter({adapter!r}, path) first"
            )
        release_idle_pool()  # the caller waits while the worker computes: its idle OpenMP threads must go
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = _Request(ids, params, adapter, future, samples=[None] * params.n, remaining=params.n)
        self._queue.put(request)
        return future

    def generate(self, messages: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> GenerationResult:
        """Blocking ``submit(...).result()``."""
        return self.submit(messages, **kwargs).result()

    async def agenerate(
        self, messages: Sequence[dict[str, Any]] | None = None, **kwargs: Any
    ) -> GenerationResult:
        """Async generate: never blocks the event loop (the worker thread does the work)."""
        return await asyncio.wrap_future(self.submit(messages, **kwargs))

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a peft LoRA adapter saved with ``save_pretrained`` under ``name`` (replaces a same-named one)."""
        if not name or "@" in name or name == BASE_ADAPTER:
            raise ValueError(f"Invalid adapter name {name!r}")
        self._run_command("load", (name, str(path)))

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; waits until no running sequence uses it."""
        if name not in self.adapters:
            raise KeyError(f"Adapter {name!r} is not loaded")
        self._run_command("unload", (name,))

    def close(self) -> None:
        """Stop the worker; pending requests fail with RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------- worker

    def _run_command(self, kind: str, args: tuple) -> None:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._commands_lock:
            self._commands.append((kind, args, future))
        self._queue.put(_WAKE)
        future.result()

    def _reset_batch(self) -> None:
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # (B, L) bool, True = real token; set with the cache (None until then)
        self._positions: Any = None  # (B,) position of the next token
        self._last_tokens: Any = None  # (B,) token to feed next

    def _worker(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        waiting: list[_Request] = []
        while True:
            block = not self._rows and not waiting
            if block:  # idle: free the cores for other threads' parallel work (a trainer's update)
                release_idle_pool()
            try:
                item = self._queue.get(block=block)
                while True:
                    if item is None:
                        running = [row.request for row in self._rows]
                        self._fail_all(waiting + running, RuntimeError("LocalEngine closed"))
                        self._reset_batch()
                        return
                    if item is not _WAKE:
                        waiting.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self._run_commands()
                with torch.inference_mode():
                    waiting = self._admit(waiting)
                    if self._rows:
                        self._decode_step()
            except Exception as exc:  # a failed forward must not kill the worker: fail the affected requests
                self._fail_all([row.request for row in self._rows], exc)
                self._reset_batch()

    def _fail_all(self, requests: list[_Request], exc: BaseException) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(exc)

    def _run_commands(self) -> None:
        with self._commands_lock:
            pending, self._commands = self._commands, []
        keep = []
        for kind, args, future in pending:
            if kind == "unload" and any(row.request.adapter == args[0] for row in self._rows):
                keep.append((kind, args, future))
                continue
            try:
                (self._lora.load if kind == "load" else self._lora.unload)(*args)
                future.set_result(None)
            except Exception as exc:
                future.set_exception(exc)
        if keep:
            with self._commands_lock:
                self._commands[:0] = keep

    def _forward(self, *args: Any) -> torch.Tensor:
        """One forward (input_ids, attention_mask, position_ids, cache, adapters): last-position logits (B, V)."""
        return self._lora.forward(*args)

    def _admit(self, waiting: list[_Request]) -> list[_Request]:
        """Prefill requests that fit in the batch and merge them into it; return those that must wait."""
        still_waiting, wave = [], []
        free = self.max_batch_size - len(self._rows)
        for request in waiting:
            if request.future.cancelled():
                continue
            if request.adapter is not None and request.adapter not in self.adapters:
                request.future.set_exception(KeyError(f"Adapter {request.adapter!r} was unloaded"))
                continue
            if request.params.n > free:
                still_waiting.append(request)
                continue
            wave.append(request)
            free -= request.params.n
        if not wave:
            return still_waiting
        prompts = [WavePrompt(r.prompt_ids, r.adapter, r.params.n) for r in wave]
        prefill = prefill_wave(prompts, self._forward, self._base_model.config, self.device, self.stats)
        for i, exc in prefill.failures.items():  # this prompt's prefill failed: fail it alone, never retry it
            wave[i].future.set_exception(exc)
        if prefill.blocks:
            first_new = len(self._rows)
            self._merge(prefill.blocks, wave)
            self._sample_and_advance(torch.cat([b.logits for b in prefill.blocks]), rows_offset=first_new)
        return still_waiting

    def _new_rows(self, request: _Request) -> list[_Row]:
        """The n rows of a prefilled request, each with its own generator seeded from the request's seed."""
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(62)
        room = self.max_positions - len(request.prompt_ids)
        rows = []
        for i in range(request.params.n):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(hash((seed, i)) & ((1 << 62) - 1))
            rows.append(_Row(request, i, generator, min(request.params.max_tokens, room)))
        return rows

    def _merge(self, blocks: list[PrefilledBlock], wave: list[_Request]) -> None:
        """Append prefilled blocks to the running batch (in place, or in one rebuild), left-padded to a common width."""
        caches, running = [block.cache for block in blocks], [] if self._cache is None else [self._cache]
        masks = (
            [self._mask, *(block.mask for block in blocks)] if running else [block.mask for block in blocks]
        )
        width = max(mask.shape[1] for mask in masks)
        if not running or not append_cache_rows(self._cache, caches, width):
            self._cache = concat_caches(self._base_model.config, running + caches, width, self.max_batch_size)
        self._mask = torch.cat([left_pad_mask(mask, width) for mask in masks])
        new_rows = [row for block in blocks for i in block.members for row in self._new_rows(wave[i])]
        positions = torch.tensor([len(row.request.prompt_ids) for row in new_rows], device=self.device)
        new_last = torch.zeros(len(new_rows), dtype=torch.long, device=self.device)
        if self._positions is not None:
            positions = torch.cat([self._positions, positions])
            new_last = torch.cat([self._last_tokens, new_last])
        self._positions, self._last_tokens = positions, new_last
        self._rows.extend(new_rows)

    def _decode_step(self) -> None:
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        if self._use_bool_mask:
            attention = self._mask[:, None, None, :]  # (B, 1, 1, L) passed through as a ready 4D mask
        else:
            attention = self._mask.to(torch.long)
        logits = self._forward(
            self._last_tokens[:, None],
            attention,
            self._positions[:, None],
            self._cache,
            [row.request.adapter for row in self._rows],
        )
        self._positions += 1
        self._sample_and_advance(logits, rows_offset=0)

    def _sample_and_advance(self, logits: torch.Tensor, rows_offset: int) -> None:
        """Sample one token for rows[rows_offset:] from logits (B', V), record it, retire finished rows."""
        rows = self._rows[rows_offset:]
        params, generators = [row.request.params for row in rows], [row.generator for row in rows]
        tokens, logprobs = sample_tokens(logits, params, generators, self.logprobs_mode == "processed")
        self._last_tokens[rows_offset:] = tokens
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()
        finished = []
        for j, row in enumerate(rows):
            row.token_ids.append(token_list[j])
            row.logprobs.append(logprob_list[j])
            reason = self._finish_reason(row)
            if reason is not None:
                finished.append(rows_offset + j)
                self._complete(row, reason)
        if finished:
            self._drop_rows(finished)

    def _finish_reason(self, row: _Row) -> str | None:
        if row.token_ids[-1] in self.eos_token_ids:
            return "stop"
        stops = row.request.params.stop
        if stops:
            window = max(len(s) for s in stops) + 4
            tail = self.tokenizer.decode(row.token_ids[-window:], skip_special_tokens=True)
            if any(s in tail for s in stops):
                return "stop"
        if len(row.token_ids) >= row.max_tokens:
            return "length"
        return None

    def _complete(self, row: _Row, reason: str) -> None:
        request = row.request
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        if reason == "stop" and request.params.stop:
            cuts = [text.find(s) for s in request.params.stop if s in text]
            if cuts:
                text = text[: min(cuts)]
        request.samples[row.index] = Sample(row.token_ids, row.logprobs, text, reason)
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            result = GenerationResult(
                prompt_token_ids=request.prompt_ids,
                samples=[s for s in request.samples if s is not None],
                adapter=request.adapter,
                latency_s=time.perf_counter() - request.submitted,
            )
            request.future.set_result(result)

    def _drop_rows(self, finished: list[int]) -> None:
        # The last rows move into the holes (one row copy each): the batch's row order is free.
        order = fill_order(len(self._rows), set(finished))
        if not order:
            self._reset_batch()
            return
        keep = torch.tensor(order, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in order]
        mask = self._mask[keep]
        # Trim columns that are padding for every remaining row.
        trim = int(mask.any(dim=0).to(torch.int8).argmax())
        self._mask = mask[:, trim:]
        keep_cache_rows(self._cache, order, trim)
        self._positions = self._positions[keep]
        self._last_tokens = self._last_tokens[keep]


_WAKE = object()
_live_engines: weakref.WeakSet[LocalEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    # Stop worker threads before interpreter teardown (a daemon thread killed inside torch aborts the process).
    for engine in list(_live_engines):
        engine.close()
