"""A tiny causal-LM job on disk (teacher, tokenizer, pydoc data) for multi-process trainer runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.trainer import helpers


def make_job(
    root: Path,
    *,
    world: int,
    steps: int = 8,
    every: int = 2,
    teacher_stages: int = 1,
    top_k: float = 0.0,
    batch_size: int = 8,
    layers: int = 4,
    name: str = "par",
) -> Path:
    """Write teacher, data and a job running ``world`` CPU processes of data parallelism."""
    root.mkdir(parents=True, exist_ok=True)
    teacher_dir = root / "teacher"
    if not (teacher_dir / "config.json").exists():
        texts = [p for _, p in helpers.pydoc_paragraphs(300)]
        tok = helpers.make_tokenizer(root / "tok", texts)
        helpers.save_model(helpers.gpt2(len(tok), layers=layers), tok, teacher_dir)
        helpers.causal_data(root / "data", n_train=96, n_eval=16)
    job: dict[str, Any] = helpers.job_dict(
        name,
        "causal-lm",
        str(teacher_dir),
        str(root / "data" / "train.jsonl"),
        None,
        stages=[{"name": "output", "steps": steps, "objectives": ["logits"]}],
        batch_size=batch_size,
        every_steps=every,
    )
    job["spec"]["parallelism"] = {
        "nodes": world,
        "gpusPerNode": 0,
        "teacherPipelineStages": teacher_stages,
        "student": {"data": world, "tensor": 1, "pipeline": 1},
        "gradientCompression": {"topK": top_k},
    }
    job["spec"]["failurePolicy"] = {"maxRestarts": 1, "backoffSeconds": 1}
    return helpers.write_job(root / f"{name}.yaml", job)
