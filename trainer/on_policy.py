"""The ``on-policy`` stages (GKD / MiniLLM family): the student writes, the teacher scores, the
student learns from the teacher's scores of its own tokens.

Data. Each line of ``data.train`` gives a prompt (``prompts.prompt_of``: its ``data.promptField``,
or the first half of its text) and a dataset completion: the line's text after a prompt field,
or the rest of the text after the cut. Both are tokenized together with the student's tokenizer.

A micro-batch is one of two kinds, drawn per micro-batch from the job's seed with probability
``distillation.onPolicy.lambda``:

- *sampled*: the student completes the prompts (``student_sampling``: temperature
  ``onPolicy.temperature``, at most ``onPolicy.maxNewTokens`` tokens, KV cache, inference
  mode). A prompt keeps at most ``max(maxSeqLength/2, maxSeqLength - maxNewTokens)`` tokens
  and a completion stops at ``maxSeqLength`` in all, so a sequence never outgrows the data.
- *dataset*: the prompt and the dataset's completion, as the data has them.

The teacher scores every sequence (``TeacherService.score_ids``: with the same tokenizer the
student's token ids are sent as they are; a student with its own tokenizer sends the text its
tokens stand for through ``score_texts``, see ``on_policy_cross``) and returns its
top-``onPolicy.topK`` log-probs per position. The loss is ``on_policy_loss``: JSD_beta with
``onPolicy.beta`` over those tokens and a tail bucket, averaged over the completion tokens.
All micro-batches of a step are sampled first and their scoring requests sent together; each
micro-batch's student forward then runs while the teacher (a served one, over HTTP) is still
answering.

The stages draw from their own sampler over these examples. Its position is not checkpointed:
it is a function of how many on-policy steps came before the step a run resumes at (as the
sequence stages do), and the kind of each micro-batch is a function of the seed and its number.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .data import DataError
from .errors import TrainerError
from .on_policy_cross import StudentText, TokenBridge, align_scores, cross_on_policy_loss
from .on_policy_loss import on_policy_loss
from .prompts import text_prefix
from .sampling import BatchSampler, stage_sampler
from .sequence_objective import CompletionExample, _prompt_tokens
from .sources import resolve_source
from .stages import Phase
from .student_sampling import sample_completions
from .teacher_service import ScoredTokens, TeacherService

log = logging.getLogger(__name__)

OBJECTIVE = "on-policy"


def has_on_policy_stage(plan: list[Phase]) -> bool:
    return any(OBJECTIVE in p.objectives for p in plan)


# ---- data -----------------------------------------------------------------------------------------
def prompted_record(record: object, prompt_field: str, text_field: str) -> dict[str, str] | None:
    """``{"prompt", "completion"}`` of a data line, or None when it has no prompt."""
    if not isinstance(record, dict):
        return None
    prompt, text = record.get(prompt_field), record.get(text_field)
    text = text if isinstance(text, str) else ""
    if isinstance(prompt, str) and prompt.strip():
        return {"prompt": prompt, "completion": text}
    if not text.strip():
        return None
    head = text_prefix(text)
    return {"prompt": head, "completion": text.strip()[len(head) :]}


def read_prompted(path: Path, *, prompt_field: str, text_field: str, max_bad_fraction: float) -> list[dict[str, str]]:
    """The prompt and dataset completion of every usable line, in file order; lines with neither
    a prompt nor a text count against ``max_bad_fraction``."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records: list[dict[str, str]] = []
    bad: list[int] = []
    with path.open("rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = prompted_record(json.loads(raw.decode("utf-8")), prompt_field, text_field)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if record is None:
                bad.append(no)
            else:
                records.append(record)
    total = len(records) + len(bad)
    if bad and len(bad) / total > max_bad_fraction + 1e-9:
        raise DataError(
            f"{path}: {len(bad)} of {total} lines have neither a {prompt_field!r} nor a {text_field!r} string "
            f"(first at line {bad[0]}; maxBadFraction {max_bad_fraction:.2%})"
        )
    if bad:
        log.warning("%s: %d of %d lines have no prompt (lines %s ...)", path, len(bad), total, bad[:5])
    if not records:
        raise DataError(f"{path}: no prompts (field {prompt_field!r}, or the start of {text_field!r})")
    return records


def tokenize_prompted(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int) -> list[CompletionExample]:
    """prompt + dataset completion as token ids (at most ``max_length``), with the prompt's
    length; the completion may be empty (the prompt alone). A prompt that yields no token of
    its own is dropped."""
    texts = [r["prompt"] + r["completion"] for r in records]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
        cuts = [_prompt_tokens(o, len(r["prompt"])) for o, r in zip(enc["offset_mapping"], records, strict=True)]
    else:  # no character offsets: the prompt tokenized on its own
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        alone = tokenizer([r["prompt"] for r in records], truncation=True, max_length=max_length)
        cuts = [min(len(p), len(ids)) for p, ids in zip(alone["input_ids"], enc["input_ids"], strict=True)]
    out: list[CompletionExample] = []
    for ids, cut in zip(enc["input_ids"], cuts, strict=True):
        if cut >= 1:
            out.append(CompletionExample(index=len(out), input_ids=list(ids), label=None, prompt_tokens=cut))
    if len(out) < len(records):
        log.warning("dropped %d prompts that tokenize to no tokens", len(records) - len(out))
    return out


# ---- one micro-batch --------------------------------------------------------------------------------
@dataclass
class PendingBatch:
    """A micro-batch whose sequences are written and whose scores are on their way."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    sampled: bool
    scores: Future[list[ScoredTokens]]
    texts: list[StudentText] | None = None  # what the teacher scored, when it tokenizes otherwise

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def check_scores(scored: Sequence[ScoredTokens], sequences: Sequence[Sequence[int]]) -> None:
    """The teacher must have scored exactly the tokens it was sent (same tokenizer)."""
    if len(scored) != len(sequences):
        raise TrainerError(ExitCode.INTERNAL, f"the teacher scored {len(scored)} of {len(sequences)} sequences")
    for i, (s, seq) in enumerate(zip(scored, sequences, strict=True)):
        if s.token_ids.tolist() != list(seq):
            raise TrainerError(
                ExitCode.BAD_SPEC,
                f"the teacher scored other tokens than the student sent (sequence {i}: {len(s)} tokens for "
                f"{len(seq)}); on-policy with the same tokenizer needs a teacher that scores token ids as given",
            )


def send_to_teacher(
    teacher: TeacherService, sequences: list[list[int]], top_k: int, bridge: TokenBridge | None
) -> tuple[Future[list[ScoredTokens]], list[StudentText] | None]:
    """Ask for the teacher's scores: the token ids as they are (one tokenizer), or the text
    they stand for (the teacher tokenizes it; ``on_policy_cross``)."""
    if bridge is None:
        return teacher.score_ids(sequences, top_k), None
    texts = [bridge.text_of(s) for s in sequences]
    return teacher.score_texts([t.text for t in texts], top_k), texts


def teacher_top_k(top_k: int, student_vocab: int, bridge: TokenBridge | None) -> int:
    """K to ask for: at most the vocabulary the teacher ranks over."""
    return min(top_k, bridge.teacher_vocab if bridge is not None else student_vocab)


def batch_loss(
    forward: nn.Module,
    pending: PendingBatch,
    pad_id: int,
    beta: float,
    device: torch.device,
    bridge: TokenBridge | None = None,
) -> tuple[torch.Tensor, int]:
    """The student's forward on the micro-batch (while the teacher may still be scoring), then
    the mean JSD_beta over its completion tokens (aligned ones, across tokenizers) and their count."""
    ids, mask = right_padded(pending.sequences, pad_id)
    logits = forward(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return loss_from_scores(logits.float(), pending, beta, bridge)


def loss_from_scores(
    logits: torch.Tensor, pending: PendingBatch, beta: float, bridge: TokenBridge | None = None
) -> tuple[torch.Tensor, int]:
    """The mean JSD_beta of the student's ``logits`` [B, L, V] against the teacher's scores of
    the micro-batch (waited for here), and the number of positions it averages."""
    scored = pending.scores.result()
    if bridge is not None:
        assert pending.texts is not None
        return cross_on_policy_loss(logits, align_scores(bridge, pending.texts, scored, pending.prompt_lengths), beta)
    check_scores(scored, pending.sequences)
    return on_policy_loss(
        logits,
        [s.top_ids for s in scored],
        [s.top_logprobs for s in scored],
        pending.prompt_lengths,
        pending.lengths,
        beta,
    )


# ---- the stages -------------------------------------------------------------------------------------
class OnPolicyBatches:
    """The on-policy stages' examples, sampler and steps (module docstring)."""

    def __init__(
        self,
        spec: DistillationJobSpec,
        plan: list[Phase],
        *,
        student: nn.Module,
        forward: nn.Module,
        tokenizer: Any,
        pad_id: int,
        device: torch.device,
        base_dir: Path,
        data_rank: int,
        teacher: Callable[[], TeacherService],
        bridge: TokenBridge | None = None,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.settings = spec.distillation.on_policy
        self.student = student  # samples (never DDP-wrapped: no gradients there)
        self.forward = forward  # trains (DDP over data ranks, or the student itself)
        self.tokenizer = tokenizer  # the student's
        self.bridge = bridge  # None: the teacher tokenizes as the student does
        self.pad_id = pad_id
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = int(eos) if eos is not None else None
        self.device = device
        self.base_dir = base_dir
        self.data_rank = data_rank
        self._teacher_factory = teacher
        self._teacher: TeacherService | None = None
        self.examples: list[CompletionExample] = []
        self.sampler: BatchSampler | None = None
        self._iter: Any = None
        self._batches = 0  # micro-batches drawn so far, over all on-policy stages

    @property
    def teacher(self) -> TeacherService:
        if self._teacher is None:
            self._teacher = self._teacher_factory()
        return self._teacher

    def ready(self, start_step: int) -> dict[str, Any]:
        """Read and tokenize the prompts, place the sampler for ``start_step``; returns what the
        run's ``on-policy-ready`` event reports."""
        data = self.spec.data
        source = resolve_source(data.train, self.base_dir)
        try:
            records = read_prompted(
                source,
                prompt_field=data.prompt_field,
                text_field=data.text_field,
                max_bad_fraction=data.max_bad_fraction,
            )
        except DataError as exc:
            raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
        examples = tokenize_prompted(records, self.tokenizer, data.max_seq_length)
        if not examples:
            raise TrainerError(ExitCode.BAD_DATA, f"{source}: no prompt has a token")
        self.examples = examples
        self.sampler, self._batches = stage_sampler(
            examples, self.spec, data_rank=self.data_rank, plan=self.plan, objective=OBJECTIVE, start_step=start_step
        )
        self._iter = iter(self.sampler)
        return {"prompts": len(examples), "lambda": self.settings.lambda_, "beta": self.settings.beta}

    def samples_batch(self, number: int) -> bool:
        """Whether micro-batch ``number`` (counted over the run's on-policy stages) is one the
        student samples: a draw from the job's seed, so a rerun or a resume makes the same choice."""
        draw = random.Random(f"{self.spec.distillation.seed}/on-policy/{number}").random()
        return draw < self.settings.lambda_

    def _prompt_cap(self) -> int:
        max_len = self.spec.data.max_seq_length
        return max(max_len // 2, max_len - self.settings.max_new_tokens, 1)

    def start(self) -> PendingBatch:
        """Draw the next micro-batch, write its completions and send it to the teacher."""
        assert self._iter is not None, "ready() first"
        examples = [self.examples[p] for p in next(self._iter)]
        sampled = self.samples_batch(self._batches)
        self._batches += 1
        if sampled:
            cap = self._prompt_cap()
            prompts = [e.input_ids[: min(e.prompt_tokens, cap)] for e in examples]
            max_len = self.spec.data.max_seq_length
            limits = [min(self.settings.max_new_tokens, max_len - len(p)) for p in prompts]
            completions = sample_completions(
                self.student,
                prompts,
                max_new_tokens=limits,
                temperature=self.settings.temperature,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
            )
            sequences = [list(p) + c for p, c in zip(prompts, completions, strict=True)]
            prompt_lengths = [len(p) for p in prompts]
        else:
            sequences = [list(e.input_ids) for e in examples]
            prompt_lengths = [e.prompt_tokens for e in examples]
        vocab = int(self.student.get_output_embeddings().weight.shape[0])
        scores, texts = send_to_teacher(
            self.teacher, sequences, teacher_top_k(self.settings.top_k, vocab, self.bridge), self.bridge
        )
        return PendingBatch(sequences, prompt_lengths, sampled, scores, texts)

    def accumulate(self, accum: int) -> tuple[float, dict[str, float], int]:
        """Forward and backward of one step's micro-batches: mean loss, mean parts, tokens."""
        pending = [self.start() for _ in range(accum)]
        loss_sum, tokens = 0.0, 0
        parts = {OBJECTIVE: 0.0, "completion_length": 0.0, "sampled": 0.0}
        for batch in pending:
            loss, _ = batch_loss(self.forward, batch, self.pad_id, self.settings.beta, self.device, self.bridge)
            (loss / accum).backward()
            value = float(loss.detach())
            loss_sum += value / accum
            parts[OBJECTIVE] += value / accum
            completion = [n - p for n, p in zip(batch.lengths, batch.prompt_lengths, strict=True)]
            parts["completion_length"] += sum(completion) / len(completion) / accum
            parts["sampled"] += float(batch.sampled) / accum
            tokens += sum(batch.lengths)
        return loss_sum, parts, tokens
