"""``kdistill serve MODEL_DIR``: the inference server (FastAPI on uvicorn) for a kdistill artifact."""

from __future__ import annotations

from pathlib import Path

import typer


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
        )
        run_server(model_dir, options)
