"""``kdistill serve MODEL_DIR``: the inference server (FastAPI on uvicorn) for a kdistill artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from kdistill.serving.cascade import FallbackOptions


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model_dir: Path = typer.Argument(
            ...,
            help="Artifact directory (with kdistill.json), e.g. OUT/student-int8, or a Hugging Face model directory"
            " (config.json, tokenizer, *.safetensors).",
        ),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a pod)."),
        port: int = typer.Option(8080, min=0, max=65535, help="Port to listen on."),
        model_name: str = typer.Option("", help="Served model name (default: the job's name from the path)."),
        max_batch_size: int = typer.Option(64, min=1, help="Requests per batch at most."),
        max_batch_tokens: int = typer.Option(8192, min=1, help="Padded tokens per batch at most."),
        max_wait_ms: float = typer.Option(10.0, min=0.0, help="How long the oldest request waits for a batch."),
        max_queue: int = typer.Option(256, min=1, help="Queued requests beyond this get 429 with Retry-After."),
        max_tokens_limit: int = typer.Option(512, min=1, help="Largest max_tokens a request may ask for."),
        max_logprobs: int = typer.Option(20, min=0, help="Largest completions logprobs (top-K) in a JSON answer."),
        max_logprobs_binary: int = typer.Option(
            128, min=0, help="Largest completions logprobs (top-K) in a binary (safetensors) answer."
        ),
        trust_remote_code: bool = typer.Option(
            False, help="Let a Hugging Face model directory run its own code (never for kdistill artifacts)."
        ),
        threads: int = typer.Option(0, min=0, help="torch intra-op threads (0: torch's default)."),
        graceful_timeout: float = typer.Option(30.0, min=0.0, help="Seconds to finish in-flight requests on SIGTERM."),
        log_level: str = typer.Option("info", help="uvicorn log level."),
        fallback_url: str = typer.Option(
            "",
            help="Cascade serving: base URL of the teacher's server (kdistill serve, or for causal LMs any"
            " OpenAI-compatible server); requests the student is not confident about go there, on the same path.",
        ),
        min_confidence: float | None = typer.Option(
            None,
            min=0.0,
            max=1.0,
            help="With --fallback-url [default 0.6]: the student answers at this confidence or above"
            " (classification: top probability; causal LM: exp of the mean token log-prob of its answer).",
        ),
        fallback_timeout: float | None = typer.Option(
            None, min=0.001, help="With --fallback-url [default 30]: seconds for the whole teacher call."
        ),
        fallback_model: str = typer.Option("", help="With --fallback-url: the model field sent to the teacher."),
        fallback_on_error: str | None = typer.Option(
            None,
            help="With --fallback-url [default fail]: on a teacher error or timeout, 'fail' answers 502/504,"
            " 'student' answers with the student's own answer, marked.",
        ),
        fallback_max_in_flight: int | None = typer.Option(
            None, min=1, help="With --fallback-url [default 64]: teacher requests open at once."
        ),
    ) -> None:
        """Serve a distilled student or a teacher: OpenAI-style completions (with scoring) / chat or KServe v2 /
        classify, with dynamic batching."""
        from kdistill.serving.app import ServeLimits
        from kdistill.serving.batcher import BatchPolicy
        from kdistill.serving.model_dir import kind_of
        from kdistill.serving.server import ServeOptions
        from kdistill.serving.server import serve as run_server

        if kind_of(model_dir) is None:
            raise typer.BadParameter(
                f"{model_dir} is neither a kdistill artifact (no kdistill.json) nor a Hugging Face model directory"
                " (no config.json)",
                param_hint="MODEL_DIR",
            )
        fallback = fallback_options(
            fallback_url, min_confidence, fallback_timeout, fallback_model, fallback_on_error, fallback_max_in_flight
        )
        options = ServeOptions(
            host=host,
            port=port,
            model_name=model_name or None,
            policy=BatchPolicy(max_batch_size, max_batch_tokens, max_wait_ms, max_queue),
            limits=ServeLimits(
                max_tokens=max_tokens_limit, max_logprobs=max_logprobs, max_logprobs_binary=max_logprobs_binary
            ),
            trust_remote_code=trust_remote_code,
            threads=threads or None,
            graceful_timeout=graceful_timeout,
            log_level=log_level,
            fallback=fallback,
        )
        run_server(model_dir, options)


def fallback_options(
    url: str,
    min_confidence: float | None,
    timeout: float | None,
    model: str,
    on_error: str | None,
    max_in_flight: int | None,
) -> FallbackOptions | None:
    """The cascade's options from the command line; the fallback flags without --fallback-url are an error."""
    from kdistill.serving.cascade import FallbackOptions

    given = {
        "--min-confidence": min_confidence is not None,
        "--fallback-timeout": timeout is not None,
        "--fallback-model": bool(model),
        "--fallback-on-error": on_error is not None,
        "--fallback-max-in-flight": max_in_flight is not None,
    }
    if not url:
        if stray := [flag for flag, set_ in given.items() if set_]:
            raise typer.BadParameter(f"{', '.join(stray)} needs --fallback-url", param_hint=stray[0])
        return None
    if on_error not in (None, "fail", "student"):
        raise typer.BadParameter(f"{on_error!r} is not 'fail' or 'student'", param_hint="--fallback-on-error")
    try:
        return FallbackOptions(
            url=url,
            min_confidence=0.6 if min_confidence is None else min_confidence,
            timeout_s=30.0 if timeout is None else timeout,
            model=model,
            on_teacher_error="student" if on_error == "student" else "fail",
            max_in_flight=64 if max_in_flight is None else max_in_flight,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fallback-url") from None
