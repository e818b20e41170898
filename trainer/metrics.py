"""Prometheus metrics of a training run, served when ``KDISTILL_METRICS_PORT`` is set."""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "KDISTILL_METRICS_PORT"


class TrainerMetrics:
    """Gauges for the loss parts, temperature, throughput; histograms for step and checkpoint time.

    With no port configured the metrics are still recorded (in a private registry) so callers
    need no branches; nothing listens.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.loss = Gauge("kdistill_train_loss", "Training loss by part", ["part"], registry=r)
        self.temperature = Gauge("kdistill_train_temperature", "Distillation temperature", registry=r)
        self.tokens_per_second = Gauge("kdistill_train_tokens_per_second", "Training throughput", registry=r)
        self.step = Gauge("kdistill_train_step", "Optimizer steps done", registry=r)
        self.learning_rate = Gauge("kdistill_train_learning_rate", "Current learning rate", registry=r)
        self.step_seconds = Histogram(
            "kdistill_train_step_seconds",
            "Wall time of one optimizer step",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.checkpoint_seconds = Histogram(
            "kdistill_train_checkpoint_seconds",
            "Wall time of writing a checkpoint",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )

    def serve_from_env(self) -> int | None:
        port = os.environ.get(METRICS_PORT_ENV)
        if not port:
            return None
        try:
            start_http_server(int(port), registry=self.registry)
        except (OSError, ValueError) as exc:
            # Metrics are an aid; a taken port must not stop training.
            log.warning("metrics server on port %r not started: %s", port, exc)
            return None
        return int(port)

    def record_step(
        self,
        *,
        step: int,
        parts: dict[str, float],
        temperature: float,
        tokens_per_second: float,
        step_seconds: float,
        learning_rate: float,
    ) -> None:
        for part, value in parts.items():
            self.loss.labels(part=part).set(value)
        self.temperature.set(temperature)
        self.tokens_per_second.set(tokens_per_second)
        self.step.set(step)
        self.learning_rate.set(learning_rate)
        self.step_seconds.observe(step_seconds)
