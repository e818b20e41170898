"""The `kdistill serve` options of a served teacher, in one place for both launchers: the
operator's `<job>-teacher` Deployment and `kdistill run`'s local server.

Besides the job's batching, the server's limits must fit what the trainer will ask: the top-K
of teacher-cache and on-policy scoring (the binary log-probs limit) and the longest generation
(the max_tokens limit); the server's own defaults (128 and 512) would answer larger requests
with a 400.
"""

from __future__ import annotations

from .spec import DistillationJobSpec

# kdistill serve's defaults; a served teacher never gets less than these.
DEFAULT_MAX_LOGPROBS_BINARY = 128
DEFAULT_MAX_TOKENS_LIMIT = 512


def teacher_serve_options(spec: DistillationJobSpec) -> list[str]:
    """Options after `kdistill serve DIR` (no host or port: each launcher picks its own)."""
    batching = spec.teacher.serve.batching
    dist = spec.distillation
    top_k = max(dist.teacher_cache.top_k, dist.on_policy.top_k)
    longest = max(dist.generation.max_new_tokens, dist.on_policy.max_new_tokens)
    options = [
        "--max-batch-size",
        str(batching.max_batch_size),
        "--max-batch-tokens",
        str(batching.max_batch_tokens),
        "--max-wait-ms",
        str(batching.max_wait_ms),
        "--max-logprobs-binary",
        str(max(DEFAULT_MAX_LOGPROBS_BINARY, top_k)),
        "--max-tokens-limit",
        str(max(DEFAULT_MAX_TOKENS_LIMIT, longest)),
    ]
    if spec.teacher.trust_remote_code:
        options.append("--trust-remote-code")
    return options
