"""The batches of the ``sequence`` stages: the generated set, tokenized, and its sampler.

Before the first step of a run that has a sequence stage, the teacher writes its completions
for the prompts of ``data.train`` into ``OUT/generated/`` (generated_set.py; every rank writes
its share of the shards and resumes what a crash left). When ``data.train`` already *is* a
generated set (a folder with its manifest, say an earlier job's ``generated/``), it is used as
it is and nothing is generated.

The sequence stages draw from their own sampler over the generated examples. Its position is
not checkpointed: it is a pure function of how many sequence steps came before the step a run
resumes at, so a resumed run continues with exactly the batches an uninterrupted one would
draw; the text sampler's checkpointed position is untouched by sequence steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode

from .data import DataError
from .errors import TrainerError
from .generated_set import (
    IN_FLIGHT_SHARDS,
    SHARD_PROMPTS,
    GenerationPlan,
    ensure_generated,
    is_generated_set,
    iter_records,
)
from .prompts import read_prompts
from .sampling import BatchSampler, stage_sampler
from .sequence_objective import CompletionExample, collate_completions, tokenize_completions
from .sources import resolve_source
from .stages import Phase
from .teacher_service import TeacherService

log = logging.getLogger(__name__)

OBJECTIVE = "sequence"


def has_sequence_stage(plan: list[Phase]) -> bool:
    return any(OBJECTIVE in p.objectives for p in plan)


def teacher_identity(spec: DistillationJobSpec) -> dict[str, str]:
    """What names the teacher in a generated set's manifest: its model source, or its endpoint
    (the URL of a local ``teacher.serve`` changes from run to run; its model does not)."""
    if spec.teacher.model:
        return {"model": spec.teacher.model}
    return {"endpoint": spec.teacher.endpoint}


def in_flight_shards(spec: DistillationJobSpec) -> int:
    """Shards asked of the teacher at once: enough prompts to fill every replica's batch (the
    spec's teacher.serve.batching, also the default shape of a teacher.endpoint server)."""
    serve = spec.teacher.serve
    prompts = serve.batching.max_batch_size * max(1, serve.replicas)
    return max(IN_FLIGHT_SHARDS, -(-prompts // SHARD_PROMPTS))


def generation_plan(spec: DistillationJobSpec, prompts: list[str]) -> GenerationPlan:
    g = spec.distillation.generation
    return GenerationPlan(
        prompts=prompts,
        samples_per_prompt=g.samples_per_prompt,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        seed=spec.distillation.seed,
        teacher=teacher_identity(spec),
    )


class SequenceBatches:
    def __init__(
        self,
        spec: DistillationJobSpec,
        plan: list[Phase],
        tokenizer: Any,
        pad_id: int,
        *,
        output: Path,
        base_dir: Path,
        rank: int,
        world: int,
        data_rank: int,
        teacher: Callable[[], TeacherService],
        teacher_context: tuple[Any, int] | None = None,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.output = output
        self.base_dir = base_dir
        self.rank, self.world, self.data_rank = rank, world, data_rank
        self.teacher = teacher
        # An in-process teacher's tokenizer and context length: prompts are fitted to it.
        self.teacher_context = teacher_context
        self.examples: list[CompletionExample] = []
        self.sampler: BatchSampler | None = None

    def records(self) -> tuple[Path, list[dict[str, Any]]]:
        """The generated set's folder and its (prompt, completion) records: an existing set
        named by data.train, or this job's own."""
        data = self.spec.data
        source = resolve_source(data.train, self.base_dir)
        if is_generated_set(source):
            log.info("data.train %s is a generated set: training on it as it is", source)
            return source, list(iter_records(source))
        try:
            prompts = read_prompts(
                source,
                prompt_field=data.prompt_field,
                text_field=data.text_field,
                max_bad_fraction=data.max_bad_fraction,
            )
        except DataError as exc:
            raise TrainerError(ExitCode.BAD_DATA, str(exc)) from None
        prompts = self._fitting(prompts)
        ensure_generated(
            self.output,
            generation_plan(self.spec, prompts),
            self.teacher,
            rank=self.rank,
            world=self.world,
            in_flight=in_flight_shards(self.spec),
        )
        return self.output, list(iter_records(self.output))

    def _fitting(self, prompts: list[str]) -> list[str]:
        """The prompts that leave room: at least one completion token within data.maxSeqLength
        for the student, and maxNewTokens within the context of an in-process teacher (a served
        one refuses a prompt past its context with a 400 that names it)."""
        limits = [(self.tokenizer, self.spec.data.max_seq_length - 1, "data.maxSeqLength")]
        if self.teacher_context is not None:
            t_tok, context = self.teacher_context
            room = context - self.spec.distillation.generation.max_new_tokens
            if room < 1:
                raise TrainerError(
                    ExitCode.BAD_SPEC,
                    f"distillation.generation.maxNewTokens ({self.spec.distillation.generation.max_new_tokens}) "
                    f"leaves no room for a prompt in the teacher's context of {context} tokens",
                )
            limits.append((t_tok, room, f"the teacher's context ({context}) less generation.maxNewTokens"))
        kept = prompts
        for tok, limit, why in limits:
            lengths = [len(ids) for ids in tok(kept, add_special_tokens=True)["input_ids"]]
            fitting = [p for p, n in zip(kept, lengths, strict=True) if n <= limit]
            if len(fitting) < len(kept):
                log.warning(
                    "%d of %d prompts are longer than %d tokens (%s): left out",
                    len(kept) - len(fitting),
                    len(kept),
                    limit,
                    why,
                )
            kept = fitting
        if not kept:
            raise TrainerError(ExitCode.BAD_DATA, f"no prompt of {self.spec.data.train} fits: see the warnings above")
        return kept

    def ready(self, start_step: int) -> dict[str, Any]:
        """Generate (or find) the set, tokenize it, and place the sampler for ``start_step``;
        returns what the run's ``generated`` event reports."""
        started = time.perf_counter()
        root, records = self.records()
        examples = tokenize_completions(records, self.tokenizer, self.spec.data.max_seq_length)
        if not examples:
            raise TrainerError(
                ExitCode.BAD_DATA, "no generated example has a completion token within data.maxSeqLength"
            )
        self.examples = examples
        self.sampler, _ = stage_sampler(
            examples, self.spec, data_rank=self.data_rank, plan=self.plan, objective=OBJECTIVE, start_step=start_step
        )
        return {
            "path": str(root),
            "completions": len(records),
            "examples": len(examples),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def next_batch(self) -> dict[str, torch.Tensor]:
        assert self.sampler is not None, "ready() first"
        positions = next(self.sampler)
        return collate_completions([self.examples[p] for p in positions], self.pad_id)


def model_context(model: Any) -> int | None:
    """A causal LM's context length from its config (GPT2: n_positions; most others:
    max_position_embeddings); None when the config names neither."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def only_sequence(spec: DistillationJobSpec) -> bool:
    """Every step trains on generated completions (no QAT phase either, which trains on text):
    the data's text lines are then not needed, and prompt-only data is enough."""
    stages = spec.distillation.stages
    return all(s.objectives == [OBJECTIVE] for s in stages) and spec.quantization.mode != "qat-int8"
