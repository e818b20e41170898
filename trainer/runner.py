"""One job from spec to outputs: train, save the student, quantize, evaluate, report.

``run_job`` is shared by ``kdistill train`` (the pods' entry point), ``python -m kdistill.trainer``
and ``kdistill run``; ``main_entry`` turns any failure into the termination message and the
exit code the operator classifies.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdistill.api import DistillationJob, JobValidationError, load_job
from kdistill.api.failures import ExitCode, Termination, termination_for

from .errors import TrainerError
from .evaluate import score
from .fence import fenced_error
from .loop import Trainer
from .options import RunOptions, StepReport
from .outputs import OutputLayout, write_json_atomic, write_served_artifact, write_termination
from .progress import ProgressReporter, status_body
from .run_data import RunFiles, ensure_run_data, plan_summary

log = logging.getLogger(__name__)


def default_output(job: DistillationJob) -> Path:
    return Path("kdistill-out") / job.metadata.name


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def pick_device(job: DistillationJob, local_rank: int) -> torch.device:
    if job.spec.parallelism.gpus_per_node > 0 and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _with_status(
    opts: RunOptions, reporter: ProgressReporter | None, trainer_ref: list[Trainer]
) -> Callable[[StepReport], None] | None:
    user = opts.on_step
    if reporter is None:
        return user

    def on_step(r: StepReport) -> None:
        if reporter.fenced is not None and trainer_ref:
            raise fenced_error(trainer_ref[0].fence.attempt or 0, reporter.fenced, f"progress at step {r.step}")
        last = trainer_ref[0].last_checkpoint if trainer_ref else None
        reporter.update(
            status_body(
                stage=r.stage,
                step=r.step,
                total_steps=r.total_steps,
                loss=r.loss,
                tokens_per_second=r.tokens_per_second,
                last_checkpoint=last,
                productive_seconds=trainer_ref[0].train_seconds if trainer_ref else None,
            ),
            force=r.checkpoint is not None or r.step == r.total_steps,
        )
        if user is not None:
            user(r)

    return on_step


def run_job(job: DistillationJob, opts: RunOptions) -> dict[str, Any]:
    """Train and write every output; returns the result (what result.json holds)."""
    wall_start = time.time()
    out = opts.output
    if opts.is_writer:
        out.root.mkdir(parents=True, exist_ok=True)
    reporter = ProgressReporter.from_env() if opts.is_writer else None
    trainer_ref: list[Trainer] = []
    opts.on_step = _with_status(opts, reporter, trainer_ref)
    try:
        run_files = ensure_run_data(job.spec, opts.base_dir)
        if run_files is not None:
            log.info("scheduled run data: %s", plan_summary(run_files.plan))
        trainer = Trainer(job, opts)
        trainer_ref.append(trainer)
        if opts.is_writer and trainer.metrics.serve_from_env():
            log.info("metrics served on port %s", os.environ.get("KDISTILL_METRICS_PORT"))
        trainer.train()
        result = finish(job, trainer, opts, wall_start, run_files)
    finally:
        for trainer in trainer_ref:
            trainer.close()
        if reporter is not None:
            reporter.close()
    return result


def finish(
    job: DistillationJob, trainer: Trainer, opts: RunOptions, wall_start: float, run_files: RunFiles | None = None
) -> dict[str, Any]:
    """The run's result (``run_summary``); the writer also publishes the student, scores it and
    its INT8 conversion against the teacher, and writes the served artifact and result.json."""
    spec = job.spec
    out = opts.output
    result = run_summary(job, trainer)
    if not opts.is_writer:
        return result
    # A rank of a superseded gang attempt publishes nothing: each output is written under the fence.
    fence = trainer.fence
    fence.check("the final student")
    with fence.holding("the final student"):
        trainer.save_student(out.student)
    # A split student is read back from that folder: conversion and evaluation need it whole.
    student_fp = trainer.full_precision_student()
    result["student"] = str(out.student)
    int8, metrics = _convert_and_score(trainer, opts, student_fp, result)
    if run_files is not None:
        result["runData"] = plan_summary(run_files.plan)
        if metrics:
            from .run_scores import scheduled_scores

            served_device = torch.device("cpu") if int8 is not None else trainer.device
            served_model = int8 if int8 is not None else student_fp
            metrics.update(scheduled_scores(trainer, served_model, served_device, run_files, opts.base_dir))
    # Every mode writes the served artifact at the one path the rollout reads (mode none: fp32 weights).
    fence.check("the served artifact")
    with fence.holding("the served artifact"):
        served = write_served_artifact(
            int8 if int8 is not None else student_fp,
            trainer.student_tokenizer,
            out,
            task=spec.task,
            quantization=spec.quantization.mode,
            metrics=metrics,
        )
    result["artifact"] = str(served)
    result["metrics"] = metrics
    result["wallSeconds"] = round(time.time() - wall_start, 3)
    if fence.attempt is not None:
        result["attempt"] = fence.attempt
    with fence.holding("the result"):
        write_json_atomic(out.result, result)
    return result


def run_summary(job: DistillationJob, trainer: Trainer) -> dict[str, Any]:
    """What every rank reports of the run: its plan, progress and speed."""
    spec = job.spec
    return {
        "job": job.metadata.name,
        "task": spec.task,
        "steps": trainer.total,
        "stages": [
            {"name": p.name, "kind": p.kind, "steps": p.steps, "objectives": list(p.objectives)} for p in trainer.plan
        ],
        "resumedFrom": trainer.resumed_from,
        "tokensSeen": trainer.tokens_seen,
        "trainSeconds": round(trainer.train_seconds, 3),
        "tokensPerSecond": round(trainer.tokens_seen / trainer.train_seconds, 1) if trainer.train_seconds else 0.0,
        "quantization": spec.quantization.mode,
    }


def _convert_and_score(
    trainer: Trainer, opts: RunOptions, student_fp: Any, result: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The INT8 student (None without quantization) and the metrics the quality gate judges: the
    INT8 student's when there is one, the float one's otherwise (both recorded in ``result``)."""
    metrics: dict[str, Any] = {}
    evaluating = opts.evaluate and bool(trainer.eval_examples)
    # The teacher is evaluated once; the float and the INT8 student are both scored against it.
    teacher_eval = trainer.evaluate_teacher() if evaluating else None
    if evaluating:
        metrics = score(teacher_eval, trainer.evaluate_model(student_fp))
        result["fullPrecision"] = dict(metrics)
        trainer.event("evaluated", **metrics)
    int8 = trainer.quantized_student()
    if int8 is not None and evaluating:
        int8_eval = trainer.evaluate_model(int8, torch.device("cpu"))
        int8_metrics = score(teacher_eval, int8_eval) if int8_eval else {}
        result["int8"] = dict(int8_metrics)
        metrics = int8_metrics  # the quality gate judges the artifact that will be served
    return int8, metrics


def classify(exc: BaseException) -> tuple[ExitCode, str]:
    if isinstance(exc, TrainerError):
        return exc.code, exc.message
    if isinstance(exc, JobValidationError):
        return ExitCode.BAD_SPEC, str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return ExitCode.RETRYABLE, f"out of memory: {exc}"
    dist_error = getattr(torch.distributed, "DistBackendError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return ExitCode.PEER_LOST, f"collective failed: {exc}"
    from .parallel.distributed import is_peer_failure

    if torch.distributed.is_available() and torch.distributed.is_initialized() and is_peer_failure(exc):
        # gloo reports a vanished peer as a plain RuntimeError ("Connection closed by peer").
        return ExitCode.PEER_LOST, f"collective failed: {str(exc).strip().splitlines()[0][:500]}"
    return ExitCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def _quiet_transformers() -> None:
    """transformers' own progress bars (loading/writing shards) would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main_entry(
    config: Path,
    output: Path | None,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> int:
    """Run one job file and return the exit code; writes the termination message either way."""
    rank, world, local_rank = dist_env()
    _quiet_transformers()
    try:
        job = load_job(config)
        layout = OutputLayout(output or default_output(job))
        opts = RunOptions(
            output=layout,
            base_dir=config.resolve().parent,
            rank=rank,
            world=world,
            device=pick_device(job, local_rank),
            on_step=on_step,
            on_event=on_event,
        )
        result = run_job(job, opts)
    except BaseException as exc:  # every failure must become an exit code and a message
        if isinstance(exc, KeyboardInterrupt):
            code, message = ExitCode.PREEMPTED, "interrupted"
        else:
            code, message = classify(exc)
        if code == ExitCode.INTERNAL:
            traceback.print_exc()
        elif code == ExitCode.FENCED:
            log.error("%s; exiting without writing anything more", message)
        print(f"kdistill: {code.name}: {message}", file=sys.stderr, flush=True)
        write_termination(termination_for(code, message))
        return int(code)
    if rank == 0:
        summary: dict[str, Any] = {
            k: result[k] for k in ("metrics", "steps", "tokensPerSecond", "wallSeconds") if k in result
        }
        write_termination(Termination(reason="Succeeded", retryable=False, result=summary))
    return 0
