"""How one optimizer step's micro-batches run, by flow: ``single`` (one process, or data-parallel
replicas under DDP) and ``model_parallel`` (a student split over ranks by tensor and/or pipeline
parallelism). Both implement ``TrainingFlow``; the loop in ``loop.py`` drives either."""

from .base import CheckpointState, TrainingFlow

__all__ = ["CheckpointState", "TrainingFlow"]
