"""A served artifact's score on a JSON-lines eval file, as the trainer's eval computes it.

For comparisons outside one run (`kdistill schedule run`: the challenger and the champion on the
newest and on older eval data). Causal-LM artifacts only: a classifier's label ids come from the
data of the run that trained it, so two runs' classifiers need not agree on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifact import load_artifact
from .batching import collate
from .data import read_jsonl, tokenize_examples
from .evaluate import EvalResult, evaluate

BATCH_SIZE = 16


def score_artifact(model_dir: Path, eval_file: Path, *, text_field: str, max_seq_length: int) -> EvalResult:
    """Perplexity of the artifact in `model_dir` (student-int8/) on `eval_file`."""
    artifact = load_artifact(model_dir)
    if artifact.task != "causal-lm":
        raise ValueError(f"{model_dir}: scoring outside a run supports causal-lm artifacts, not {artifact.task}")
    rows = read_jsonl(eval_file, text_field=text_field, label_field=None, label_to_id=None, max_bad_fraction=1.0)
    examples = sorted(tokenize_examples(rows, artifact.tokenizer, max_seq_length), key=len)
    if not examples:
        raise ValueError(f"{eval_file}: no eval examples")
    pad = int(artifact.tokenizer.pad_token_id)
    batches = [collate(examples[i : i + BATCH_SIZE], pad, "causal-lm") for i in range(0, len(examples), BATCH_SIZE)]
    return evaluate(artifact.model, batches, "causal-lm", torch.device("cpu"))
