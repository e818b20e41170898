"""The served model: tokenization limits, the batch functions the batcher's worker thread calls,
and the warm-up that gates readiness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.trainer.artifact import Artifact

from .batcher import BatchStats
from .generation import GenRequest, GenResult, generate_batch
from .metrics import ServerMetrics


@dataclass
class TokenCount:
    """Tokens a batch processed, handed from run_* to the batch-stats hook."""

    value: int = 0


class Engine:
    def __init__(self, artifact: Artifact, metrics: ServerMetrics) -> None:
        self.artifact = artifact
        self.model = artifact.model.eval()
        self.tokenizer = artifact.tokenizer
        self.task = artifact.task
        self.metrics = metrics
        config = self.model.config
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 512
        tok_max = getattr(self.tokenizer, "model_max_length", None) or positions
        self.max_context = int(min(positions, tok_max))
        id2label = getattr(config, "id2label", None) or {}
        num_labels = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._last_tokens = TokenCount()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.inference_mode()
    def run_classification(self, batch: list[list[int]]) -> list[list[float]]:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        self._last_tokens.value = sum(len(r) for r in batch)
        self.metrics.tokens.labels("input").inc(self._last_tokens.value)
        return torch.softmax(logits.float(), dim=-1).tolist()

    def run_generation(self, batch: list[GenRequest]) -> list[GenResult]:
        results = generate_batch(self.model, self.tokenizer, batch)
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        self.metrics.tokens.labels("input").inc(prompt)
        self.metrics.tokens.labels("generated").inc(completion)
        self._last_tokens.value = prompt + completion
        return results

    def on_batch(self, stats: BatchStats) -> None:
        self.metrics.observe_batch(stats, self._last_tokens.value)

    def warm_up(self) -> None:
        """One real pass of each shape family, so the first request does not pay for lazy init
        (kernel packing, allocator growth)."""
        probe = self.encode("warm up") or [self.pad_id]
        if self.task == "causal-lm":
            self.run_generation([GenRequest(probe, max_tokens=2, temperature=0.0),
                                 GenRequest(probe[:1], max_tokens=1, temperature=0.0)])
        else:
            self.run_classification([probe, probe[:1]])
