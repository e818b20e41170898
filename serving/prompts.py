"""A completions prompt as text or as token ids, checked against the served model.

The OpenAI API and vLLM take ``prompt`` as a string, a list of strings, a list of token ids or a
list of id lists; a trainer scoring its own tokens sends ids, so that nothing is re-tokenized.
Ids must lie in the model's vocabulary and fit its context, like the tokens of a text.
"""

from __future__ import annotations

from .engine import Engine
from .errors import ApiError
from .front import Front

Prompt = str | list[int]


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[list[Prompt], bool]:
    """The request's prompts, and whether it sent a single one (a string or one id list)."""
    if isinstance(prompt, str):
        return [prompt], True
    if prompt and isinstance(prompt[0], int):
        return [[int(t) for t in prompt]], True
    return list(prompt), False  # type: ignore[arg-type]


def vocab_size(engine: Engine) -> int:
    """Ids the model's embedding takes (the config's vocabulary, which may exceed the tokenizer's)."""
    size = getattr(engine.model.config, "vocab_size", None)
    return int(size) if size else len(engine.tokenizer)


def check_ids(engine: Engine, ids: list[int], param: str, reserve: int = 0) -> list[int]:
    """``ids`` when every id is in the vocabulary and they fit the context with ``reserve`` to spare."""
    if not ids:
        raise ApiError(400, f"{param} must not be empty", param)
    vocab = vocab_size(engine)
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ApiError(400, f"{param}[{i}] is token id {t}, outside the vocabulary [0, {vocab})", param)
    if len(ids) + reserve > engine.max_context:
        extra = f" plus max_tokens {reserve}" if reserve else ""
        raise ApiError(
            400, f"{param} is {len(ids)} tokens{extra}, beyond the model's context of {engine.max_context}", param
        )
    return ids


def encode_prompt(front: Front, engine: Engine, prompt: Prompt, param: str, reserve: int = 0) -> list[int]:
    """Token ids of one prompt: a text encoded, or ids checked."""
    if isinstance(prompt, list):
        return check_ids(engine, prompt, param, reserve)
    return front.encode_text(engine, prompt, param, reserve)


def prompt_text(engine: Engine, prompt: Prompt) -> str:
    """The prompt as text (ids decoded): what an echo answer and text offsets start from."""
    if isinstance(prompt, list):
        return str(engine.tokenizer.decode(prompt))
    return prompt
