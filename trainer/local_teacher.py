"""``LocalTeacher``: the ``TeacherService`` of a teacher loaded in this process.

It answers what ``HttpTeacher`` answers, from the weights at hand: scoring is one right-padded
forward per group of sequences and an FP32 log-softmax (the served teacher's ``serving/scoring.py``
does the same), generation is transformers' ``generate`` with its KV cache, in inference mode.
Every call runs at once and returns a finished Future, so callers written for a served teacher
(keep requests in flight, collect later) work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from .teacher_service import GenerationParams, ScoredTokens


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _failed(error: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(error)
    return future


class LocalTeacher:
    """An in-process teacher behind the ``TeacherService`` interface (module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- scoring ---------------------------------------------------------------------------------
    def score_ids(self, sequences: Sequence[Sequence[int]], top_k: int) -> Future[list[ScoredTokens]]:
        try:
            return _done(self._score([[int(t) for t in s] for s in sequences], top_k, None))
        except Exception as exc:  # handed to the caller through the Future
            return _failed(exc)

    def score_texts(self, texts: Sequence[str], top_k: int) -> Future[list[ScoredTokens]]:
        try:
            ids, offsets = [], []
            for text in texts:
                enc = self.tokenizer(text, return_offsets_mapping=True)
                ids.append(list(enc["input_ids"]))
                offsets.append(torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2))
            return _done(self._score(ids, top_k, offsets))
        except Exception as exc:
            return _failed(exc)

    @torch.inference_mode()
    def _score(self, sequences: list[list[int]], top_k: int, offsets: list[torch.Tensor] | None) -> list[ScoredTokens]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if any(not s for s in sequences):
            raise ValueError("cannot score an empty sequence")
        out: list[ScoredTokens] = []
        for start in range(0, len(sequences), self.batch_size):
            group = sequences[start : start + self.batch_size]
            width = max(len(s) for s in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for j, s in enumerate(group):
                ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[j, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for j, s in enumerate(group):
                n = len(s)
                logp = torch.log_softmax(logits[j, : n - 1].float(), dim=-1).cpu()
                nxt = ids[j, 1:n]
                own = torch.cat([torch.full((1,), float("nan")), logp.gather(-1, nxt[:, None])[:, 0]])
                k = min(top_k, logp.shape[-1])
                top_lp, top_ids = torch.topk(logp, k, dim=-1)
                top_lp = torch.cat([torch.full((1, k), float("nan")), top_lp])
                top_ids = torch.cat([torch.full((1, k), -1, dtype=torch.int64), top_ids])
                span = offsets[start + j] if offsets is not None else None
                out.append(ScoredTokens(torch.tensor(s, dtype=torch.int64), own, top_ids, top_lp, span))
        return out

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: GenerationParams) -> Future[list[list[str]]]:
        try:
            return _done(self._generate(list(prompts), params))
        except Exception as exc:
            return _failed(exc)

    @torch.inference_mode()
    def _generate(self, prompts: list[str], params: GenerationParams) -> list[list[str]]:
        was_training = self.model.training
        self.model.eval()
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        try:
            results: list[list[str]] = []
            for start in range(0, len(prompts), self.batch_size):
                group = prompts[start : start + self.batch_size]
                enc = self.tokenizer(group, return_tensors="pt", padding=True).to(self.device)
                sample = params.temperature > 0
                # A fork keeps generation's draws out of the training stream's random state.
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    if params.seed is not None:
                        torch.manual_seed(params.seed + start)
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=params.max_new_tokens,
                        do_sample=sample,
                        temperature=params.temperature if sample else None,
                        top_p=params.top_p if sample else None,
                        top_k=0 if sample else None,
                        num_return_sequences=params.n,
                        pad_token_id=self.pad_id,
                        use_cache=True,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                results += [texts[i * params.n : (i + 1) * params.n] for i in range(len(group))]
            return results
        finally:
            self.tokenizer.padding_side = side
            self.model.train(was_training)

    def close(self) -> None:
        """Nothing to release: the weights belong to the caller."""
