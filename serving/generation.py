"""Batched generation: one prefill over the left-padded prompts, then decode steps over a shared KV
cache. A sequence that finishes (eos, a stop string, max_tokens, or its client went away) leaves the
batch at once: its rows are dropped from the cache, so the remaining steps cost less.

Each request samples with its own ``torch.Generator``, so a seeded request is reproducible.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import inference_mode
from .scoring import TokenLogprobs, rows_logprobs

FinishReason = Literal["stop", "length"]


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Top-K alternatives to return with each generated token's log-prob (None: no log-probs).
    logprobs: int | None = None
    # Called on the worker thread with each new piece of text, and once with the finish reason.
    on_text: Callable[[str, FinishReason | None], None] | None = None
    # Called on the worker thread as soon as this sequence finishes, while the rest of its batch
    # still decodes: the server answers it then rather than when the longest sequence ends.
    on_done: Callable[[GenResult], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class DecodeStats:
    """Decode steps run and the rows they decoded: rows / steps is the mean decode batch."""

    steps: int = 0
    rows: int = 0


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: TokenLogprobs | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from a [V] logit row: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_p, 0) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string and must not be streamed yet."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


class _Row:
    def __init__(self, req: GenRequest, tokenizer: Any) -> None:
        self.req = req
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: FinishReason | None = None
        # Only stop strings and streaming need the text after every token; otherwise decoding once at
        # the end saves a detokenization of the whole prefix per step and row.
        self.incremental = bool(req.stop) or req.on_text is not None
        # Per generated token (when the request asks for log-probs): own log-prob, top ids, top log-probs.
        self.lp: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.gen = torch.Generator()
        self.gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % (2**63)))

    def push(self, token: int, eos_id: int | None) -> None:
        if eos_id is not None and token == eos_id:
            self.finish = "stop"
        else:
            self.ids.append(token)
            if self.incremental:
                self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
                cut = min((i for s in self.req.stop if (i := self.text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish = "stop"
            if self.finish is None and len(self.ids) >= self.req.max_tokens:
                self.finish = "length"
        if self.finish is None and self.req.cancelled.is_set():
            self.finish = "stop"
        if self.finish is not None and not self.incremental:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit()
        if self.finish is not None and self.req.on_done is not None:
            self.req.on_done(self.result())

    def record(self, logits: torch.Tensor, token: int) -> None:
        """The model's log-prob of ``token`` (before temperature and top-p) and its top-K."""
        k = self.req.logprobs or 0
        own, top_ids, top_lp = rows_logprobs(logits[None], torch.tensor([token]), k)
        self.lp.append((own, top_ids, top_lp))

    def result(self) -> GenResult:
        lp = None
        if self.req.logprobs is not None:
            k = self.req.logprobs
            lp = TokenLogprobs(
                list(self.ids),
                torch.cat([o for o, _, _ in self.lp]) if self.lp else torch.zeros(0),
                torch.cat([t for _, t, _ in self.lp]) if self.lp else torch.zeros((0, k), dtype=torch.int32),
                torch.cat([v for _, _, v in self.lp]) if self.lp else torch.zeros((0, k)),
            )
        return GenResult(self.text, self.ids, self.finish or "length", len(self.req.prompt_ids), lp)

    def _emit(self) -> None:
        if self.req.on_text is None:
            return
        upto = len(self.text) if self.finish else len(self.text) - held_back(self.text, self.req.stop)
        # A multi-byte character split across tokens decodes to U+FFFD until complete: wait for it.
        while upto > self.sent and self.text[upto - 1] == "\ufffd" and not self.finish:
            upto -= 1
        if upto > self.sent:
            self.req.on_text(self.text[self.sent : upto], None)
            self.sent = upto
        if self.finish:
            self.req.on_text("", self.finish)


def _forward_kwargs(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """transformers 5 renamed ``past_key_values`` to ``cache``; ``logits_to_keep=1`` spares the
    full-vocabulary projection of every prompt position."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# Admission callback of continuous batching: (free rows, tokens already budgeted) -> requests to join.
Admit = Callable[[int, int], list[GenRequest]]


@dataclass
class _Live:
    """The rows decoding together: their shared KV cache, attention mask [B, T] (left-padded), last
    position [B], next-token logits [B, V], and which ``rows`` they are."""

    cache: Any
    mask: torch.Tensor
    last_pos: torch.Tensor
    logits: torch.Tensor
    active: list[int]


def _prefill(model: nn.Module, requests: list[GenRequest], first_row: int, pad_id: int, extra: dict[str, Any]) -> _Live:
    """One forward over the left-padded prompts (every prompt ends at the last column)."""
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    return _Live(
        _cache_of(out), mask, positions[:, -1], out.logits[:, -1, :], list(range(first_row, first_row + len(requests)))
    )


def _sample(live: _Live, rows: list[_Row], eos_id: int | None) -> list[int]:
    """One token per live row (pushed to the row), in ``live.active`` order."""
    # Greedy rows take one argmax over the whole batch: one kernel and one host copy per step
    # instead of one per row.
    greedy = live.logits.argmax(-1).tolist() if any(rows[i].req.temperature <= 0.0 for i in live.active) else []
    tokens = []
    for j, i in enumerate(live.active):
        row = rows[i]
        token = (
            greedy[j]
            if row.req.temperature <= 0.0
            else sample_next(live.logits[j], row.req.temperature, row.req.top_p, row.gen)
        )
        if row.req.logprobs is not None and token != eos_id:  # eos is not a returned token
            row.record(live.logits[j], token)
        row.push(token, eos_id)
        tokens.append(token)
    return tokens


def _drop_finished(live: _Live, rows: list[_Row], tokens: list[int]) -> list[int]:
    """Finished sequences leave the batch and the cache; columns that only they used (left padding
    nobody needs any more) are cut, so a batch that keeps admitting requests does not keep growing."""
    keep = [j for j, i in enumerate(live.active) if rows[i].finish is None]
    if len(keep) == len(live.active):
        return tokens
    index = torch.tensor(keep, dtype=torch.long)
    live.active = [live.active[j] for j in keep]
    if not keep:
        return []
    live.cache.batch_select_indices(index)
    live.mask, live.last_pos = live.mask[index], live.last_pos[index]
    unused = int(live.mask.any(0).int().argmax())  # leading columns masked out in every remaining row
    if unused and _mergeable(live.cache):
        live.mask = live.mask[:, unused:]
        for layer in live.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
    return [tokens[j] for j in keep]


def _mergeable(cache: Any) -> bool:
    """Rows can join or columns be cut only in plain dynamic caches (not sliding-window or static)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _merge(live: _Live, fresh: _Live) -> None:
    """Append ``fresh``'s rows to ``live``: both left-padded to the wider of the two caches."""
    width = max(live.mask.shape[1], fresh.mask.shape[1])

    def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - t.shape[-dim_from_end]
        return F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

    for a, b in zip(live.cache.layers, fresh.cache.layers, strict=True):
        a.keys = torch.cat([pad(a.keys, 2), pad(b.keys, 2)])
        a.values = torch.cat([pad(a.values, 2), pad(b.values, 2)])
    live.mask = torch.cat([pad(live.mask, 1), pad(fresh.mask, 1)])
    live.last_pos = torch.cat([live.last_pos, fresh.last_pos])
    live.active += fresh.active


@inference_mode
def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    requests: list[GenRequest],
    stats: DecodeStats | None = None,
    admit: Admit | None = None,
    max_rows: int | None = None,
) -> list[GenResult]:
    """Generate for all ``requests`` together (prefill once, then decode with a shared KV cache).

    ``stats``, when given, accumulates the decode steps and the rows they decoded. ``admit``, when
    given, is asked before each decode step for requests that join the running batch (continuous
    batching: while sequences finish early, waiting requests take their place instead of waiting for
    the whole batch to end); it gets the free rows (up to ``max_rows``) and the prompt + max_tokens
    already in the batch. Results come back for ``requests``, then for each admitted request in
    admission order."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    cache_arg, extra = _forward_kwargs(model)
    rows = [_Row(r, tokenizer) for r in requests]
    live = _prefill(model, requests, 0, pad_id, extra)
    tokens = _drop_finished(live, rows, _sample(live, rows, eos_id))
    max_rows = max_rows or len(requests)
    while True:
        if admit is not None and live.active and _mergeable(live.cache) and len(live.active) < max_rows:
            budgeted = sum(len(rows[i].req.prompt_ids) + rows[i].req.max_tokens for i in live.active)
            joining = admit(max_rows - len(live.active), budgeted)
            if joining:
                rows += [_Row(r, tokenizer) for r in joining]
                fresh = _prefill(model, joining, len(rows) - len(joining), pad_id, extra)
                fresh_tokens = _drop_finished(fresh, rows, _sample(fresh, rows, eos_id))
                if fresh.active:
                    _merge(live, fresh)
                    tokens += fresh_tokens
        if not live.active:
            break
        live.mask = torch.cat([live.mask, torch.ones((len(live.active), 1), dtype=torch.long)], dim=1)
        live.last_pos = live.last_pos + 1
        if stats is not None:
            stats.steps += 1
            stats.rows += len(live.active)
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long)[:, None],
            attention_mask=live.mask,
            position_ids=live.last_pos[:, None],
            use_cache=True,
            **{cache_arg: live.cache},
            **extra,
        )
        live.cache, live.logits = _cache_of(out), out.logits[:, -1, :]
        tokens = _drop_finished(live, rows, _sample(live, rows, eos_id))
    return [r.result() for r in rows]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template when it has one; otherwise a plain "role: content" transcript
    ending with "assistant:"."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])
