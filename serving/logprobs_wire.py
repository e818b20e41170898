"""Token log-probs on the wire: the OpenAI legacy ``logprobs`` object (JSON) and the compact binary
frame chosen by ``Accept: application/vnd.kdistill.logprobs+safetensors``.

The binary frame is one safetensors blob (docs/serving.md, "Scoring"): every choice's rows
concatenated in choice order, ``lengths`` saying how many rows each choice has.

- ``token_ids`` int32 [N], ``token_logprobs`` float32 [N] (NaN: no prediction, position 0 of an
  echoed prompt);
- ``top_ids`` int32 [N, K] (-1 where no prediction), ``top_logprobs`` float32 [N, K], most likely
  first;
- ``lengths`` int32 [choices];
- ``text_offsets`` int32 [N, 2], only when every prompt of an echo request was text: each token's
  character span in its prompt, from the tokenizer's offset mapping (what aligns the tokens of
  two tokenizers by their text);
- metadata: ``format`` (``kdistill.logprobs/1``), ``model``, ``k``, ``echo``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .scoring import TokenLogprobs

BINARY_MEDIA_TYPE = "application/vnd.kdistill.logprobs+safetensors"
BINARY_FORMAT = "kdistill.logprobs/1"


def wants_binary(accept: str | None) -> bool:
    """Whether the ``Accept`` header names the binary frame (any parameters ignored)."""
    if not accept:
        return False
    return any(part.split(";")[0].strip().lower() == BINARY_MEDIA_TYPE for part in accept.split(","))


class TokenStrings:
    """Each token id as the text it decodes to alone, cached: a top-K answer repeats ids often."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = str(self.tokenizer.decode([token]))
        return text


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def token_id_name(token: int) -> str:
    """A token named by its id, as vLLM's ``return_tokens_as_token_ids`` names it."""
    return f"token_id:{token}"


def openai_logprobs(
    lp: TokenLogprobs, strings: TokenStrings, text_start: int = 0, *, ids_as_names: bool = False
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object. ``top_logprobs`` maps token text to log-prob, so
    two ids that decode to the same text share one entry; the binary frame keeps the ids, and so
    does ``ids_as_names`` (tokens named ``token_id:N``; offsets still count the decoded text)."""
    texts = [strings(t) for t in lp.token_ids]
    name = token_id_name if ids_as_names else strings
    tokens = [token_id_name(t) for t in lp.token_ids] if ids_as_names else texts
    offsets, at = [], text_start
    for t in texts:
        offsets.append(at)
        at += len(t)
    own = lp.token_logprobs.tolist()
    top_ids, top_lp = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    tops: list[dict[str, float] | None] = []
    for i in range(len(tokens)):
        if math.isnan(own[i]):
            tops.append(None)
            continue
        row: dict[str, float] = {}
        for t, v in zip(top_ids[i], top_lp[i], strict=True):
            row.setdefault(name(t), v)
        tops.append(row)
    return {"tokens": tokens, "token_logprobs": [_num(x) for x in own], "top_logprobs": tops, "text_offset": offsets}


def binary_frame(
    choices: Sequence[TokenLogprobs],
    *,
    model: str,
    k: int,
    echo: bool,
    text_offsets: Sequence[torch.Tensor] | None = None,
) -> bytes:
    """The safetensors blob of ``choices`` (module docstring); ``text_offsets``: each choice's
    [T, 2] character spans, for scored texts."""
    from safetensors.torch import save

    tensors = {
        "token_ids": torch.tensor([t for c in choices for t in c.token_ids], dtype=torch.int32),
        "token_logprobs": torch.cat([c.token_logprobs.float() for c in choices]),
        "top_ids": torch.cat([c.top_ids.to(torch.int32) for c in choices]).reshape(-1, k).contiguous(),
        "top_logprobs": torch.cat([c.top_logprobs.float() for c in choices]).reshape(-1, k).contiguous(),
        "lengths": torch.tensor([len(c.token_ids) for c in choices], dtype=torch.int32),
    }
    if text_offsets is not None:
        tensors["text_offsets"] = torch.cat([o.to(torch.int32).reshape(-1, 2) for o in text_offsets]).contiguous()
    metadata = {"format": BINARY_FORMAT, "model": model, "k": str(k), "echo": "true" if echo else "false"}
    return bytes(save(tensors, metadata=metadata))


def read_binary_frame(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A frame's tensors and metadata (clients and tests)."""
    import json
    import struct

    from safetensors.torch import load

    (header_len,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    return load(blob), {str(k): str(v) for k, v in metadata.items()}
