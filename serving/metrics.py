"""Prometheus metrics of one server, in their own registry (so tests can run several servers)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EFFICIENCY_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "kdistill_request_latency_seconds",
            "Request latency, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kdistill_batch_size", "Requests per model batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.padding = Histogram(
            "kdistill_padding_efficiency",
            "Real tokens / padded tokens per batch.",
            buckets=EFFICIENCY_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Gauge(
            "kdistill_padding_efficiency_ratio", "Real / padded tokens over all batches so far.", registry=r
        )
        self.queue_depth = Gauge("kdistill_queue_depth", "Requests waiting for a batch.", registry=r)
        self.tokens = Counter("kdistill_tokens", "Tokens processed.", ["kind"], registry=r)
        self.tokens_per_second = Gauge("kdistill_tokens_per_second", "Tokens per second of the last batch.", registry=r)
        self.errors = Counter(
            "kdistill_errors", "Requests answered with an error, by status.", ["endpoint", "status"], registry=r
        )
        self.in_flight = Gauge(
            "kdistill_requests_in_flight", "Model requests accepted and not yet answered.", registry=r
        )
        self.decode_steps = Counter("kdistill_decode_steps", "Batched decode steps run.", registry=r)
        self.decode_rows = Counter(
            "kdistill_decode_rows",
            "Sequences decoded, summed over decode steps (/ steps: mean decode batch).",
            registry=r,
        )
        self.rejected = Counter("kdistill_rejected", "Requests refused because the queue was full.", registry=r)
        self.int8_kernel = Gauge(
            "kdistill_int8_kernel",
            "1 for each kernel that runs the model's INT8 layers ('none': a float model), from which input "
            "row count on, and how it was chosen (measured, cache, table, forced).",
            ["kernel", "source", "from_rows"],
            registry=r,
        )
        # Cascade serving (serving/cascade.py); empty unless the server has a fallback teacher.
        self.cascade_items = Counter(
            "kdistill_cascade_items",
            "Items (texts, prompts, chats) by who was asked last: the student alone, or forwarded to the "
            "teacher (forwarded / all: the forwarded share).",
            ["endpoint", "path"],
            registry=r,
        )
        self.cascade_latency = Histogram(
            "kdistill_cascade_latency_seconds",
            "Request latency by path: student (every item answered by the student) or teacher (at least one "
            "item forwarded; the student's attempt included).",
            ["endpoint", "path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cascade_teacher_latency = Histogram(
            "kdistill_cascade_teacher_latency_seconds",
            "Duration of the teacher calls that answered.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cascade_teacher_errors = Counter(
            "kdistill_cascade_teacher_errors",
            "Teacher calls that failed, by reason (timeout, connect, status, answer).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.cascade_confidence = Histogram(
            "kdistill_cascade_confidence",
            "The student's confidence per item (classification: top probability; causal LM: exp of the mean "
            "token log-prob), what minConfidence is compared with.",
            ["endpoint"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self._real = 0
        self._padded = 0

    def set_int8_kernel(self, kernel: str, source: str, bands: list[list[Any]] | None = None) -> None:
        self.int8_kernel.clear()
        self.int8_kernel.labels(kernel, source, "1").set(1)
        for rows, band_kernel in bands or []:
            self.int8_kernel.labels(band_kernel, source, str(rows)).set(1)

    def observe_batch(self, stats: BatchStats, tokens: int) -> None:
        self.batch_size.observe(stats.size)
        self.padding.observe(stats.padding_efficiency)
        self._real += stats.real_tokens
        self._padded += stats.padded_tokens
        self.padding_ratio.set(self._real / self._padded if self._padded else 1.0)
        self.queue_depth.set(stats.queue_depth)
        if stats.seconds > 0:
            self.tokens_per_second.set(tokens / stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
