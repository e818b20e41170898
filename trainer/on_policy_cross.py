"""On-policy distillation for a student whose tokenizer is not the teacher's: text is the interface.

The student's tokens are turned into text (the bytes each token stands for, joined), the teacher
tokenizes and scores that text (``TeacherService.score_texts``, which returns each token's
character offsets), and the two tokenizations are aligned by bytes
(``cross_tokenizer.aligned_positions``): where a student token and a teacher token end at the same
byte, both models see the same text as context and predict what follows it.

At each aligned position that predicts a completion token, the teacher's top-K tokens are
mapped to the student's ids through the shared vocabulary (``cross_tokenizer.SharedVocabulary``:
tokens that stand for the same bytes in both); teacher tokens without a student counterpart join
the teacher's tail. The divergence is then ``on_policy_loss.bucket_jsd`` over the mapped tokens
and the tail buckets, exactly as with one tokenizer: with identical tokenizers and text the
student wrote the way the tokenizer cuts it, every position aligns, every token maps to itself
and the loss equals the one-tokenizer loss. A position where none of the teacher's top tokens is
shared compares two one-bucket distributions (divergence 0) and is left out of the mean.

Text that is not valid UTF-8 (a byte-level student can sample a lone continuation byte) is
aligned only up to its first invalid byte.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .cross_tokenizer import SharedVocabulary, aligned_positions, byte_offsets, token_keys
from .on_policy_loss import bucket_jsd
from .teacher_service import ScoredTokens


@dataclass(frozen=True)
class StudentText:
    """A student sequence as text: the text, and each token's byte span in it (tokens past the
    first invalid byte are left out)."""

    text: str
    offsets: list[tuple[int, int]]  # byte spans of the first len(offsets) tokens


class TokenBridge:
    """What the student's ids stand for as bytes, and the student id of each teacher id that
    stands for the same bytes (-1: none)."""

    def __init__(self, student_tok: Any, teacher_tok: Any, student_size: int) -> None:
        keys = token_keys(student_tok)
        # Special tokens (eos, pad) stand for no text.
        self.student_bytes = {i: (b"" if kind == "special" else b) for i, (kind, b) in keys.items()}
        teacher_size = len(teacher_tok)
        shared = SharedVocabulary.from_keys(keys, token_keys(teacher_tok), student_size, teacher_size)
        self.to_student = torch.full((teacher_size,), -1, dtype=torch.long)
        self.to_student[shared.teacher_ids] = shared.student_ids
        self.shared_tokens = shared.size
        self.teacher_vocab = teacher_size

    def text_of(self, ids: Sequence[int]) -> StudentText:
        spans: list[tuple[int, int]] = []
        pieces: list[bytes] = []
        at = 0
        for i in ids:
            piece = self.student_bytes.get(int(i), b"")
            spans.append((at, at + len(piece)))
            pieces.append(piece)
            at += len(piece)
        raw = b"".join(pieces)
        try:
            return StudentText(raw.decode("utf-8"), spans)
        except UnicodeDecodeError as exc:
            valid = exc.start
            # The tokens wholly before the first invalid byte: a prefix of the sequence.
            count = next((n for n, s in enumerate(spans) if s[1] > valid), len(spans))
            return StudentText(raw[:valid].decode("utf-8"), spans[:count])

    def map_teacher_ids(self, ids: Tensor) -> Tensor:
        """Student ids of teacher ids (-1 where the teacher's token has no student twin)."""
        inside = (ids >= 0) & (ids < self.to_student.numel())
        out = torch.full_like(ids, -1)
        out[inside] = self.to_student[ids[inside]]
        return out


@dataclass
class AlignedRows:
    """The positions to train: student (row in batch, position) pairs, the teacher's top tokens
    there mapped to student ids, and their log-probs."""

    rows: list[int]
    positions: list[int]
    top_ids: list[Tensor]  # each [k_i] student ids, k_i >= 1
    top_logprobs: list[Tensor]  # each [k_i]


def align_scores(
    bridge: TokenBridge,
    texts: Sequence[StudentText],
    scored: Sequence[ScoredTokens],
    prompt_lengths: Sequence[int],
) -> AlignedRows:
    """For each sequence, the aligned positions whose next student token is a completion token."""
    out = AlignedRows([], [], [], [])
    for b, (st, sc, p_len) in enumerate(zip(texts, scored, prompt_lengths, strict=True)):
        if sc.offsets is None:
            raise ValueError("the teacher's scores of text carry no token offsets")
        t_off = byte_offsets([tuple(o) for o in sc.offsets.tolist()], st.text)
        s_pos, t_pos = aligned_positions(st.offsets, t_off, None)
        for i, j in zip(s_pos, t_pos, strict=True):
            if i + 1 < p_len:
                continue  # predicts a prompt token: context only
            # Row j+1 of the teacher's scores is its distribution of what follows token j.
            mapped = bridge.map_teacher_ids(sc.top_ids[j + 1])
            keep = mapped >= 0
            if not bool(keep.any()):
                continue
            out.rows.append(b)
            out.positions.append(i)
            out.top_ids.append(mapped[keep])
            out.top_logprobs.append(sc.top_logprobs[j + 1][keep])
    return out


def cross_on_policy_loss(student_logits: Tensor, aligned: AlignedRows, beta: float) -> tuple[Tensor, int]:
    """The mean JSD_beta over the aligned completion positions, and their count. Rows with the
    same number of shared teacher tokens go through ``bucket_jsd`` together."""
    if not aligned.rows:
        return student_logits.sum() * 0.0, 0
    groups: dict[int, list[int]] = defaultdict(list)
    for n, ids in enumerate(aligned.top_ids):
        groups[int(ids.numel())].append(n)
    device = student_logits.device
    total = student_logits.new_zeros((), dtype=torch.float32)
    for members in groups.values():
        rows = torch.tensor([aligned.rows[n] for n in members], device=device)
        positions = torch.tensor([aligned.positions[n] for n in members], device=device)
        ids = torch.stack([aligned.top_ids[n] for n in members]).to(device)
        lps = torch.stack([aligned.top_logprobs[n] for n in members]).to(device)
        total = total + bucket_jsd(student_logits[rows, positions], ids, lps, beta).sum()
    return total / len(aligned.rows), len(aligned.rows)
