"""How far the student is from the teacher where it matters on-policy: on its own samples.

``held_out_divergence`` lets the student complete held-out prompts (its own generator, seeded,
so two calls on the same student draw the same samples), has the teacher score the sequences,
and averages JSD_beta over the completion tokens, the quantity the on-policy objective lowers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .on_policy import PendingBatch, loss_from_scores, right_padded, send_to_teacher, teacher_top_k
from .on_policy_cross import TokenBridge
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
    bridge: TokenBridge | None = None,
) -> dict[str, float]:
    """``{"divergence": mean JSD_beta per completion token, "tokens": positions averaged,
    "meanLength": mean completion length}`` of the student's samples on ``prompts`` (with
    ``bridge``, a student with its own tokenizer: the aligned positions, ``on_policy_cross``)."""
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = int(student.get_output_embeddings().weight.shape[0])
    was_training = student.training
    student.eval()
    total, tokens, sequences_seen, written = 0.0, 0, 0, 0
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
            scores, texts = send_to_teacher(teacher, sequences, teacher_top_k(top_k, vocab, bridge), bridge)
            pending = PendingBatch(sequences, [len(p) for p in chunk], True, scores, texts)
            ids, mask = right_padded(sequences, pad_id)
            logits = student(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            loss, count = loss_from_scores(logits, pending, beta, bridge)
            total += float(loss) * count
            tokens += count
            sequences_seen += len(sequences)
            written += sum(len(c) for c in completions)
    finally:
        student.train(was_training)
    return {
        "divergence": total / tokens if tokens else 0.0,
        "tokens": float(tokens),
        "meanLength": written / sequences_seen if sequences_seen else 0.0,
    }
