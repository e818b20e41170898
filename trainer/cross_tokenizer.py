"""Logits KD between a teacher and a student that tokenize text differently.

Both tokenizers cut the same text; their tokens are compared where they see the same text.

**Alignment by bytes.** Each token ends at a byte of the text's UTF-8 form (character offsets
from a fast tokenizer, turned into byte positions). A byte position ``b`` is a *boundary* of a
tokenization when some token ends exactly there and the next token does not start inside it
(byte-level BPE can split one multi-byte character over two tokens; that cut is no boundary).
Positions whose boundaries coincide on both sides see the same text ``text[:b]`` as context,
so the student's and the teacher's next-token distributions there are predictions of the same
thing: what follows ``b``. ``aligned_positions`` lists those pairs of positions, and
``align_by_bytes`` cuts both token sequences into spans that cover the same bytes.

**uld** (Universal Logit Distillation, Boizard et al. 2024): at each aligned position, both
probability vectors (softmax at temperature T) are sorted in decreasing order, the shorter is
padded with zeros to the longer vocabulary, and the loss is their L1 distance
``sum_i |p_s(i) - p_t(i)|``, the paper's closed form of the Wasserstein-1 distance between the
two. It needs no mapping between vocabularies; it matches the shape of the distributions
(how sure the teacher is), not which token it favours.

**byte-span**: at each aligned position, the teacher's next-token distribution (softmax at
temperature T) is carried into the student's vocabulary by bytes: each teacher token's
probability goes to the student token with the same bytes, or else to the longest student
token its bytes begin with (the student's first piece of that text); teacher tokens with no
counterpart (special tokens the student lacks) are dropped and the rest renormalised. The loss
is the job's ``distillation.loss`` (forward KL, reverse KL or JSD) between that distribution
and the student's, times T², as for ordinary logits KD. A student token that receives no
teacher mass counts as probability ``PROJECTED_FLOOR``. With identical tokenizers every
position aligns, every token maps to itself, and the loss is ordinary per-token KD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import divergence_from_logprobs

Offsets = Sequence[tuple[int, int]] | Sequence[Sequence[int]]
# Probability given to a student token that no teacher token maps to (byte-span): a finite
# log for reverse KL and JSD, and a negligible term in forward KL.
PROJECTED_FLOOR = 1.0e-8


# ---- bytes of a text, boundaries of a tokenization ------------------------------------------------
def char_to_byte(text: str) -> list[int]:
    """``out[c]`` is the UTF-8 byte position of character position ``c`` (0..len(text))."""
    out = [0] * (len(text) + 1)
    pos = 0
    for i, ch in enumerate(text):
        out[i] = pos
        pos += len(ch.encode("utf-8", "surrogatepass"))
    out[len(text)] = pos
    return out


def byte_offsets(offsets: Offsets, text: str | None) -> list[tuple[int, int]]:
    """Token offsets in bytes: character offsets into ``text`` are converted; with ``text`` None
    the offsets already are byte positions."""
    if text is None:
        return [(int(a), int(b)) for a, b in offsets]
    table = char_to_byte(text)
    n = len(table) - 1
    return [(table[min(int(a), n)], table[min(int(b), n)]) for a, b in offsets]


def _nonempty_lookahead(offsets: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each token, the start of the next token with a non-empty span (None: none follows)."""
    out: list[int | None] = [None] * len(offsets)
    nxt: int | None = None
    for i in range(len(offsets) - 1, -1, -1):
        out[i] = nxt
        a, b = offsets[i]
        if b > a:
            nxt = a
    return out


def token_boundaries(offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Byte boundary -> index of the last token ending there, for a tokenization given by byte
    offsets. Ends are made monotone (special tokens report (0, 0)); a token whose next
    non-empty token starts before its end (a split multi-byte character) ends at no boundary."""
    ahead = _nonempty_lookahead(offsets)
    out: dict[int, int] = {}
    end = 0
    for i, (_, raw_end) in enumerate(offsets):
        end = max(end, raw_end)
        nxt = ahead[i]
        if nxt is None or nxt >= end:
            out[end] = i
    return out


def scored_bytes(offsets: Sequence[tuple[int, int]]) -> int:
    """UTF-8 bytes of the tokens a causal LM predicts (all but the first): bytes up to the last
    token's end minus bytes up to the first token's end."""
    if len(offsets) < 2:
        return 0
    first_end = offsets[0][1]
    last_end = max(b for _, b in offsets)
    return max(0, last_end - first_end)


# ---- alignment ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """Tokens ``student[0]:student[1]`` and ``teacher[0]:teacher[1]`` (half-open index ranges)
    cover the same bytes ``bytes[0]:bytes[1]`` of the text."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    bytes: tuple[int, int]


def align_by_bytes(student_offsets: Offsets, teacher_offsets: Offsets, text: str | None = None) -> list[Span]:
    """Cut both tokenizations of one text into spans ending at their common byte boundaries.

    Offsets are (start, end) per token: character offsets into ``text`` (what fast tokenizers'
    ``return_offsets_mapping`` and ``ScoredTokens.offsets`` give), or byte offsets when ``text``
    is None. Tokens after the last common boundary (one side truncated earlier) are in no span.
    A span holds one token per side when both cut the text the same way there.
    """
    s_off, t_off = byte_offsets(student_offsets, text), byte_offsets(teacher_offsets, text)
    s_b, t_b = token_boundaries(s_off), token_boundaries(t_off)
    spans: list[Span] = []
    prev_s = prev_t = -1
    prev_b = 0
    for b in sorted(set(s_b) & set(t_b)):
        i, j = s_b[b], t_b[b]
        if i == prev_s and j == prev_t:
            continue
        spans.append(Span((prev_s + 1, i + 1), (prev_t + 1, j + 1), (prev_b, b)))
        prev_s, prev_t, prev_b = i, j, b
    return spans


def aligned_positions(
    student_offsets: Offsets, teacher_offsets: Offsets, text: str | None = None
) -> tuple[list[int], list[int]]:
    """Pairs of causal-LM positions (student i, teacher j) whose contexts are the same text:
    token i of the student and token j of the teacher both end at one common boundary, and
    both have a next token to predict (position i's logits predict token i + 1)."""
    s_off, t_off = byte_offsets(student_offsets, text), byte_offsets(teacher_offsets, text)
    s_b, t_b = token_boundaries(s_off), token_boundaries(t_off)
    s_pos: list[int] = []
    t_pos: list[int] = []
    for b in sorted(set(s_b) & set(t_b)):
        i, j = s_b[b], t_b[b]
        if i + 1 < len(s_off) and j + 1 < len(t_off):
            s_pos.append(i)
            t_pos.append(j)
    return s_pos, t_pos


# ---- shared vocabulary ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    text = f"{type(decoder).__name__} {decoder!r}"
    if "ByteLevel" in text:
        return "byte-level"
    if "Metaspace" in text or "ByteFallback" in text:
        return "metaspace"
    return "text"


TokenKey = tuple[str, bytes]


def token_keys(tokenizer: Any) -> dict[int, TokenKey]:
    """What each token id stands for: ("special", name) for special and added tokens,
    ("bytes", b) when the token's bytes are known (byte-level BPE, SentencePiece pieces and
    byte fallback), else ("text", token string)."""
    kind = _decoder_kind(tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    table = _byte_decoder()
    out: dict[int, TokenKey] = {}
    for token, idx in tokenizer.get_vocab().items():
        if idx in specials:
            out[idx] = ("special", token.encode("utf-8"))
        elif kind == "byte-level" and all(c in table for c in token):
            out[idx] = ("bytes", bytes(table[c] for c in token))
        elif kind == "metaspace" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[idx] = ("bytes", bytes([int(token[3:5], 16)]))
        elif kind == "metaspace":
            out[idx] = ("bytes", token.replace("▁", " ").encode("utf-8"))
        else:
            out[idx] = ("text", token.encode("utf-8"))
    return out


@dataclass(frozen=True)
class SharedVocabulary:
    """Student and teacher ids of the tokens both vocabularies hold (same bytes), pairwise, and
    whether each side has tokens outside them (then its tail bucket exists)."""

    student_ids: Tensor  # [K] int64
    teacher_ids: Tensor  # [K] int64
    student_rest: bool
    teacher_rest: bool

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    @classmethod
    def from_keys(
        cls, student: dict[int, TokenKey], teacher: dict[int, TokenKey], student_size: int, teacher_size: int
    ) -> SharedVocabulary:
        """``*_size`` are the models' output widths (a model may have more rows than tokens)."""
        by_key: dict[TokenKey, int] = {}
        for idx in sorted(teacher):
            if idx < teacher_size:
                by_key.setdefault(teacher[idx], idx)
        s_ids: list[int] = []
        t_ids: list[int] = []
        taken: set[int] = set()
        for idx in sorted(student):
            t = by_key.get(student[idx])
            if idx < student_size and t is not None and t not in taken:
                s_ids.append(idx)
                t_ids.append(t)
                taken.add(t)
        return cls(
            torch.tensor(s_ids, dtype=torch.long),
            torch.tensor(t_ids, dtype=torch.long),
            student_rest=len(s_ids) < student_size,
            teacher_rest=len(t_ids) < teacher_size,
        )

    @classmethod
    def from_tokenizers(
        cls, student_tok: Any, teacher_tok: Any, student_size: int, teacher_size: int
    ) -> SharedVocabulary:
        return cls.from_keys(token_keys(student_tok), token_keys(teacher_tok), student_size, teacher_size)

    def to(self, device: torch.device) -> SharedVocabulary:
        return SharedVocabulary(
            self.student_ids.to(device), self.teacher_ids.to(device), self.student_rest, self.teacher_rest
        )


@dataclass(frozen=True)
class VocabularyProjection:
    """Where each teacher token's probability goes in the student's vocabulary (byte-span):
    ``teacher_to_student[t]`` is the student id with the same bytes as teacher token t, else the
    longest student token its bytes begin with, else -1 (dropped)."""

    teacher_to_student: Tensor  # [Vt] int64
    student_size: int
    exact: int = 0  # teacher tokens mapped to a student token of the same bytes

    @property
    def dropped(self) -> int:
        return int((self.teacher_to_student < 0).sum())

    @classmethod
    def from_keys(
        cls, student: dict[int, TokenKey], teacher: dict[int, TokenKey], student_size: int, teacher_size: int
    ) -> VocabularyProjection:
        by_key: dict[TokenKey, int] = {}
        for idx in sorted(student):
            if idx < student_size:
                by_key.setdefault(student[idx], idx)
        longest = max((len(k[1]) for k in by_key), default=0)
        mapping = [-1] * teacher_size
        exact = 0
        for idx in range(teacher_size):
            key = teacher.get(idx)
            if key is None:
                continue
            if key in by_key:
                mapping[idx] = by_key[key]
                exact += 1
                continue
            if key[0] == "special":
                continue
            kind, raw = key
            for cut in range(min(len(raw) - 1, longest), 0, -1):
                hit = by_key.get((kind, raw[:cut]))
                if hit is not None:
                    mapping[idx] = hit
                    break
        return cls(torch.tensor(mapping, dtype=torch.long), student_size, exact)

    @classmethod
    def from_tokenizers(
        cls, student_tok: Any, teacher_tok: Any, student_size: int, teacher_size: int
    ) -> VocabularyProjection:
        """``*_size`` are the models' output widths (a model may have more rows than tokens)."""
        return cls.from_keys(token_keys(student_tok), token_keys(teacher_tok), student_size, teacher_size)

    def to(self, device: torch.device) -> VocabularyProjection:
        return VocabularyProjection(self.teacher_to_student.to(device), self.student_size, self.exact)

    def project(self, teacher_logp: Tensor) -> Tensor:
        """Teacher log-probs [N, Vt] -> log-probs over the student's ids [N, Vs], renormalised
        over the teacher tokens kept; ids that get no mass hold log(PROJECTED_FLOOR)."""
        keep = self.teacher_to_student >= 0
        probs = teacher_logp.exp()[:, keep]
        out = probs.new_zeros(probs.shape[0], self.student_size).index_add_(1, self.teacher_to_student[keep], probs)
        out = out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
        floor = torch.full_like(out, PROJECTED_FLOOR)
        return torch.where(out > 0, out, floor).log()


# ---- the losses ----------------------------------------------------------------------------------
def uld_distance(student_rows: Tensor, teacher_rows: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row ULD: ``sum_i |sort(p_s)_i - sort(p_t)_i|`` over probability vectors (softmax at
    ``temperature``) sorted in decreasing order, the shorter zero-padded. Returns [N]."""
    if student_rows.dim() != 2 or teacher_rows.dim() != 2 or student_rows.shape[0] != teacher_rows.shape[0]:
        raise ValueError(
            f"expected [N, Vs] and [N, Vt] rows, got {tuple(student_rows.shape)} and {tuple(teacher_rows.shape)}"
        )
    dtype = torch.float64 if student_rows.dtype == torch.float64 else torch.float32
    p_s = F.softmax(student_rows.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_rows.to(dtype) / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(dim=-1)


def byte_span_divergence(
    student_rows: Tensor, teacher_rows: Tensor, projection: VocabularyProjection, kind: str, temperature: float = 1.0
) -> Tensor:
    """Per-row T²·D between the teacher's distribution carried into the student's vocabulary
    (``VocabularyProjection.project``) and the student's. Returns [N]."""
    if student_rows.shape[0] != teacher_rows.shape[0]:
        raise ValueError(f"row counts differ: {student_rows.shape[0]} and {teacher_rows.shape[0]}")
    if student_rows.shape[-1] != projection.student_size:
        raise ValueError(f"student rows have {student_rows.shape[-1]} ids, the projection {projection.student_size}")
    dtype = torch.float64 if student_rows.dtype == torch.float64 else torch.float32
    log_s = F.log_softmax(student_rows.to(dtype) / temperature, dim=-1)
    log_t = projection.project(F.log_softmax(teacher_rows.to(dtype) / temperature, dim=-1))
    return divergence_from_logprobs(log_s, log_t, kind) * (temperature * temperature)


@dataclass(frozen=True)
class CrossTokenizerKD:
    """The configured cross-tokenizer KD term: ``method`` uld or byte-span, the divergence of
    byte-span (``distillation.loss``), and its vocabulary projection (byte-span only)."""

    method: str
    divergence: str
    projection: VocabularyProjection | None = None

    def __call__(self, student_rows: Tensor, teacher_rows: Tensor, temperature: float) -> Tensor:
        if self.method == "uld":
            return uld_distance(student_rows, teacher_rows, temperature)
        if self.method == "byte-span":
            assert self.projection is not None
            return byte_span_divergence(student_rows, teacher_rows, self.projection, self.divergence, temperature)
        raise ValueError(f"unknown crossTokenizer.method {self.method!r}; expected uld or byte-span")


# ---- data: both tokenizations of each example ----------------------------------------------------
@dataclass(frozen=True)
class CrossExample:
    """The teacher's tokens of one example and the aligned (student, teacher) positions."""

    teacher_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]


def encode_with_offsets(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[Any]]]:
    """Token ids and character offsets of each text, truncated to ``max_length`` tokens like the
    training data (the same call plus offsets, so the ids are the ones the model trains on)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: cross-tokenizer alignment needs "
            "the character offsets of tokens (return_offsets_mapping)"
        )
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True)
    return [(list(ids), list(offs)) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def collate_cross(
    student_examples: Sequence[Any], cross: dict[int, CrossExample], teacher_pad: int
) -> dict[str, Tensor]:
    """The teacher's side of a batch: ``teacher_input_ids``/``teacher_attention_mask`` [B, Lt]
    (right-padded) and the aligned positions as three [N] index tensors ``align_row``,
    ``align_student``, ``align_teacher`` (row in the batch, student position, teacher position)."""
    items = [cross[ex.index] for ex in student_examples]
    longest = max(len(c.teacher_ids) for c in items)
    ids = torch.full((len(items), longest), teacher_pad, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    rows: list[int] = []
    s_pos: list[int] = []
    t_pos: list[int] = []
    for r, c in enumerate(items):
        ids[r, : len(c.teacher_ids)] = torch.tensor(c.teacher_ids, dtype=torch.long)
        mask[r, : len(c.teacher_ids)] = 1
        rows += [r] * len(c.student_positions)
        s_pos += c.student_positions
        t_pos += c.teacher_positions
    return {
        "teacher_input_ids": ids,
        "teacher_attention_mask": mask,
        "align_row": torch.tensor(rows, dtype=torch.long),
        "align_student": torch.tensor(s_pos, dtype=torch.long),
        "align_teacher": torch.tensor(t_pos, dtype=torch.long),
    }


def cross_examples(
    examples: Sequence[Any], student_tok: Any, teacher_tok: Any, max_length: int, *, chunk: int = 1024
) -> dict[int, CrossExample]:
    """Example index -> its teacher tokens and aligned positions, for examples with ``index``
    and ``text`` (data.Example), both sides truncated to ``max_length`` tokens."""
    out: dict[int, CrossExample] = {}
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        texts = [e.text for e in part]
        students = encode_with_offsets(student_tok, texts, max_length)
        teachers = encode_with_offsets(teacher_tok, texts, max_length)
        for ex, (_, s_off), (t_ids, t_off) in zip(part, students, teachers, strict=True):
            s_pos, t_pos = aligned_positions(s_off, t_off, ex.text)
            out[ex.index] = CrossExample(t_ids, s_pos, t_pos)
    return out


def scored_bytes_by_index(examples: Sequence[Any], tokenizer: Any, max_length: int) -> dict[int, int]:
    """Example index -> UTF-8 bytes of the tokens a causal LM is scored on (``scored_bytes``);
    empty when the tokenizer gives no offsets (not a fast tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        return {}
    encoded = encode_with_offsets(tokenizer, [e.text for e in examples], max_length)
    return {
        ex.index: scored_bytes(byte_offsets(offs, ex.text)) for ex, (_, offs) in zip(examples, encoded, strict=True)
    }


def collate_with_teacher(
    examples: Sequence[Any], pad_id: int, task: str, *, cross: dict[int, CrossExample], teacher_pad: int
) -> dict[str, Tensor]:
    """A padded student batch (batching.collate) plus its teacher's side (``collate_cross``)."""
    from .batching import collate

    batch = collate(examples, pad_id, task)  # type: ignore[arg-type]
    batch.update(collate_cross(examples, cross, teacher_pad))
    return batch
