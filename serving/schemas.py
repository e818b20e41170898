"""Request bodies. Strict types: ``"max_tokens": "5"`` is an error naming the field, not a coercion.

Limits that depend on the server's flags (max_tokens, batch sizes, context) are checked in the
handlers, so the error can name the field and the configured limit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4
MAX_TEXT_CHARS = 100_000


class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, logprobs, ...): ignore them, check the rest strictly.
    model_config = ConfigDict(strict=True, extra="ignore")


class SamplingParams(_Body):
    """What every generation request shares (OpenAI completions and chat): how many tokens, how to
    sample them, where to stop, and whether to stream."""

    model: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False


# A prompt as text or as token ids of the served model's vocabulary (as the OpenAI API and vLLM
# take them): a string, a list of strings, a list of ids, or a list of id lists.
PromptField = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingParams):
    prompt: PromptField  # count, sizes and ids checked in the handler, against the server's limits
    # 0 only with echo (scoring the prompt); checked in the handler so the error can say so.
    max_tokens: int = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)  # top-K per token; the limit is the server's
    # vLLM's option: tokens in a JSON logprobs answer named "token_id:N", so that no two collide.
    return_tokens_as_token_ids: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT_CHARS)


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class ClassifyRequest(_Body):
    model: str | None = None
    texts: list[str] = Field(min_length=1)


class InferTensor(_Body):
    """One KServe v2 input tensor: texts as ``datatype: BYTES``, shape [N] (or [N, 1])."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(_Body):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
