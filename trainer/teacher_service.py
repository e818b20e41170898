"""What the trainer asks of a teacher that writes and scores text: the one interface behind
which an in-process teacher and a served one (``kdistill serve``, vLLM, TGI over HTTP) look
the same to the sequence and on-policy objectives and to the teacher cache.

Every call returns a ``Future`` so that callers can keep requests in flight while the student
steps: an HTTP teacher answers them concurrently (its server batches them); the in-process
teacher answers at once and returns a finished future.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class GenerationParams:
    """How the teacher writes completions (the API's ``distillation.generation``)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1  # completions per prompt
    seed: int | None = None


@dataclass(frozen=True)
class ScoredTokens:
    """The teacher's log-probs for one token sequence, position by position.

    ``logprobs[t]`` is log p(token_ids[t] | token_ids[:t]); position 0 has no context and holds
    NaN. ``top_ids[t]``/``top_logprobs[t]`` are the teacher's K most likely tokens at position t
    (again given token_ids[:t]), most likely first; row 0 is all -1 / NaN.
    ``offsets`` are the character spans of each token in the text that was scored, when text
    was sent (cross-tokenizer alignment needs them); None when token ids were sent.
    """

    token_ids: torch.Tensor  # [T] int64
    logprobs: torch.Tensor  # [T] float32
    top_ids: torch.Tensor  # [T, K] int64
    top_logprobs: torch.Tensor  # [T, K] float32
    offsets: torch.Tensor | None = None  # [T, 2] int64, character offsets into the text

    def __len__(self) -> int:
        return int(self.token_ids.numel())


class TeacherService(Protocol):
    """A teacher the trainer reaches through text or token ids, not through its weights."""

    def score_ids(self, sequences: Sequence[Sequence[int]], top_k: int) -> Future[list[ScoredTokens]]:
        """Score token sequences written in the teacher's own vocabulary (same tokenizer)."""
        ...

    def score_texts(self, texts: Sequence[str], top_k: int) -> Future[list[ScoredTokens]]:
        """Tokenize each text with the teacher's tokenizer and score it (other tokenizers)."""
        ...

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> Future[list[list[str]]]:
        """``params.n`` completions (text after the prompt) for each prompt, in order."""
        ...

    def close(self) -> None: ...
