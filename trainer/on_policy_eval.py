"""How far the student is from the teacher where it matters on-policy: on its own samples.

``held_out_divergence`` lets the student complete held-out prompts (its own generator, seeded,
so two calls on the same student draw the same samples), has the teacher score the sequences,
and averages JSD_beta over the completion tokens, the quantity the on-policy objective lowers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .on_policy import check_scores, right_padded
from .on_policy_loss import on_policy_loss
from .student_sampling import sample_completions
from .teacher_service import TeacherService


@torch.no_grad()
def held_out_divergence(
    student: nn.Module,
    teacher: TeacherService,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    beta: float,
    eos_id: int | None,
    pad_id: int,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """``{"divergence": mean JSD_beta per completion token, "tokens": completion tokens,
    "meanLength": mean completion length}`` of the student's samples on ``prompts``."""
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = int(student.get_output_embeddings().weight.shape[0])
    was_training = student.training
    student.eval()
    total, tokens, sequences_seen = 0.0, 0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            completions = sample_completions(
                student,
                chunk,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_id=eos_id,
                pad_id=pad_id,
                generator=generator,
            )
            sequences = [p + c for p, c in zip(chunk, completions, strict=True)]
            scored = teacher.score_ids(sequences, min(top_k, vocab)).result()
            check_scores(scored, sequences)
            ids, mask = right_padded(sequences, pad_id)
            logits = student(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            loss, count = on_policy_loss(
                logits,
                [s.top_ids for s in scored],
                [s.top_logprobs for s in scored],
                [len(p) for p in chunk],
                [len(s) for s in sequences],
                beta,
            )
            total += float(loss) * count
            tokens += count
            sequences_seen += len(sequences)
    finally:
        student.train(was_training)
    return {
        "divergence": total / tokens if tokens else 0.0,
        "tokens": float(tokens),
        "meanLength": tokens / sequences_seen if sequences_seen else 0.0,
    }
