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
from torch import nn

FinishReason = Literal["stop", "length"]


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
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

    def result(self) -> GenResult:
        return GenResult(self.text, self.ids, self.finish or "length", len(self.req.prompt_ids))

    def _emit(self) -> None:
        if self.req.on_text is None:
            return
        upto = len(self.text) if self.finish else len(self.text) - held_back(self.text, self.req.stop)
        # A multi-byte character split across tokens decodes to U+FFFD until complete: wait for it.
        while upto > self.sent and self.text[upto - 1] == "\ufffd" and not self.finish:
            upto -= 1
        if upto > self.sent:
            self.req.on_text(self.text[self.sent:upto], None)
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


@torch.inference_mode()
def generate_batch(model: nn.Module, tokenizer: Any, requests: list[GenRequest],
                   stats: DecodeStats | None = None) -> list[GenResult]:
    """Generate for all ``requests`` together (prefill once, then decode with a shared KV cache).
    ``stats``, when given, accumulates the decode steps and the rows they decoded."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    rows = [_Row(r, tokenizer) for r in requests]
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):  # left padding: every prompt ends at the last column
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg, extra = _forward_kwargs(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache, logits = _cache_of(out), out.logits[:, -1, :]
    active = list(range(len(rows)))
    last_pos = positions[:, -1]
    while True:
        next_tokens = []
        # Greedy rows take one argmax over the whole batch: one kernel and one host copy per step
        # instead of one per row.
        greedy = logits.argmax(-1).tolist() if any(rows[i].req.temperature <= 0.0 for i in active) else []
        for j, i in enumerate(active):
            row = rows[i]
            token = (greedy[j] if row.req.temperature <= 0.0
                     else sample_next(logits[j], row.req.temperature, row.req.top_p, row.gen))
            row.push(token, eos_id)
            next_tokens.append(token)
        keep = [j for j, i in enumerate(active) if rows[i].finish is None]
        if not keep:
            break
        if len(keep) < len(active):  # finished sequences leave the batch and the cache
            index = torch.tensor(keep, dtype=torch.long)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            next_tokens = [next_tokens[j] for j in keep]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        last_pos = last_pos + 1
        if stats is not None:
            stats.steps += 1
            stats.rows += len(active)
        out = model(input_ids=torch.tensor(next_tokens, dtype=torch.long)[:, None], attention_mask=mask,
                    position_ids=last_pos[:, None], use_cache=True, **{cache_arg: cache}, **extra)
        cache, logits = _cache_of(out), out.logits[:, -1, :]
    return [r.result() for r in rows]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template when it has one; otherwise a plain "role: content" transcript
    ending with "assistant:"."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])
