"""Cross-tokenizer KD: byte alignment on hand-made offsets and real tokenizers, ULD and
byte-span against direct definitions, byte-span on one tokenizer is ordinary KD, gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdistill.trainer.cross_tokenizer import (
    PROJECTED_FLOOR,
    CrossExample,
    CrossTokenizerKD,
    SharedVocabulary,
    Span,
    VocabularyProjection,
    align_by_bytes,
    aligned_positions,
    byte_offsets,
    byte_span_divergence,
    collate_cross,
    encode_with_offsets,
    scored_bytes,
    token_boundaries,
    token_keys,
    uld_distance,
)
from kdistill.trainer.data import TokenizedExample
from kdistill.trainer.losses import kd_divergence

KINDS = ["forward-kl", "reverse-kl", "jsd"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- alignment -----------------------------------------------------------------------------------
def test_spans_end_at_common_boundaries() -> None:
    text = "hello world"
    student = [(0, 5), (5, 11)]  # "hello", " world"
    teacher = [(0, 2), (2, 5), (5, 6), (6, 11)]  # "he", "llo", " ", "world"
    assert align_by_bytes(student, teacher, text) == [
        Span((0, 1), (0, 2), (0, 5)),
        Span((1, 2), (2, 4), (5, 11)),
    ]
    # Position 0 of the student and 1 of the teacher both saw "hello"; the last tokens predict nothing.
    assert aligned_positions(student, teacher, text) == ([0], [1])


def test_identical_tokenizations_align_every_position() -> None:
    offsets = [(0, 3), (3, 4), (4, 9), (9, 12)]
    spans = align_by_bytes(offsets, offsets)
    assert [s.student for s in spans] == [s.teacher for s in spans] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert aligned_positions(offsets, offsets) == ([0, 1, 2], [0, 1, 2])


def test_split_multibyte_character_is_no_boundary() -> None:
    # "éa": byte-level BPE may cut é (2 bytes) in half; both halves report the character (0, 1).
    text = "éa"
    student = [(0, 1), (0, 2)]  # [c3] [a9 'a']
    teacher = [(0, 1), (1, 2)]  # [c3 a9] ['a']
    assert byte_offsets(student, text) == [(0, 2), (0, 3)]
    assert token_boundaries(byte_offsets(student, text)) == {3: 1}
    assert align_by_bytes(student, teacher, text) == [Span((0, 2), (0, 2), (0, 3))]
    assert aligned_positions(student, teacher, text) == ([], [])


def test_special_tokens_and_trimmed_offsets() -> None:
    text = "ab cd"
    # Student: BOS (0, 0), "ab", " cd" with the space trimmed from its offsets, EOS (0, 0).
    student = [(0, 0), (0, 2), (3, 5), (0, 0)]
    teacher = [(0, 1), (1, 2), (2, 5)]  # "a", "b", " cd"
    assert token_boundaries(byte_offsets(student, text)) == {0: 0, 2: 1, 5: 3}
    assert align_by_bytes(student, teacher, text) == [Span((0, 2), (0, 2), (0, 2)), Span((2, 4), (2, 3), (2, 5))]
    # Boundary 2 ("ab" seen): student position 1, teacher position 1. Boundary 5 ends the teacher.
    assert aligned_positions(student, teacher, text) == ([1], [1])


def test_truncated_side_leaves_the_rest_unaligned() -> None:
    text = "one two three"
    student = [(0, 3), (3, 7), (7, 13)]
    teacher = [(0, 3), (3, 7)]  # truncated after "two"
    assert align_by_bytes(student, teacher, text) == [Span((0, 1), (0, 1), (0, 3)), Span((1, 2), (1, 2), (3, 7))]
    assert aligned_positions(student, teacher, text) == ([0], [0])


def test_scored_bytes_leave_out_the_first_token() -> None:
    assert scored_bytes([(0, 3), (3, 4), (4, 9)]) == 6
    assert scored_bytes([(0, 3)]) == 0
    assert scored_bytes(byte_offsets([(0, 1), (1, 3)], "aéé")) == 4


def test_real_tokenizers_align_and_share_byte_tokens(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    from kdistill.trainer.tokenizer_build import build_tokenizer

    texts = [" ".join(p.split()) for t in sorted(topics)[:40] for p in topics[t].split("\n\n") if len(p) > 40]
    small = build_tokenizer(texts[::2], 400, tmp_path / "small")
    large = build_tokenizer(texts[1::2], 900, tmp_path / "large")
    text = "The loop — naïve café: x = f(y) ** 2"
    (s_ids, s_off), (t_ids, t_off) = (
        encode_with_offsets(small, [text], 64)[0],
        encode_with_offsets(large, [text], 64)[0],
    )
    assert s_ids != t_ids
    spans = align_by_bytes(s_off, t_off, text)
    raw = text.encode()
    assert spans[-1].bytes[1] == len(raw)
    for span in spans:
        # Each span's tokens decode to exactly the span's bytes, on both sides.
        for ids, (a, b) in ((s_ids, span.student), (t_ids, span.teacher)):
            keys = token_keys(small if ids is s_ids else large)
            assert b"".join(keys[i][1] for i in ids[a:b]) == raw[span.bytes[0] : span.bytes[1]]
    vocab = SharedVocabulary.from_tokenizers(small, large, len(small), len(large))
    s_keys, t_keys = token_keys(small), token_keys(large)
    assert all(s_keys[int(s)] == t_keys[int(t)] for s, t in zip(vocab.student_ids, vocab.teacher_ids, strict=True))
    assert vocab.size >= 256 + 5  # every byte and every special token
    assert vocab.student_rest and vocab.teacher_rest
    projection = VocabularyProjection.from_tokenizers(small, large, len(small), len(large))
    mapped = projection.teacher_to_student.tolist()
    for t_id, s_id in enumerate(mapped):
        if t_keys[t_id][0] == "bytes":  # every byte-level token begins with some student token
            assert s_id >= 0 and t_keys[t_id][1].startswith(s_keys[s_id][1])
    assert projection.exact == vocab.size
    same = SharedVocabulary.from_tokenizers(small, small, len(small), len(small))
    assert same.size == len(small) and not same.student_rest and not same.teacher_rest
    assert torch.equal(same.student_ids, same.teacher_ids)


# ---- ULD -----------------------------------------------------------------------------------------
def test_uld_equals_its_definition() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    temperature = 1.5
    got = uld_distance(s, t, temperature)
    for r in range(5):
        p_s = sorted(F.softmax(s[r] / temperature, -1).tolist(), reverse=True) + [0.0] * 4
        p_t = sorted(F.softmax(t[r] / temperature, -1).tolist(), reverse=True)
        assert float(got[r]) == pytest.approx(sum(abs(a - b) for a, b in zip(p_s, p_t, strict=True)), abs=1e-12)


def test_uld_ignores_which_token_is_likely() -> None:
    torch.manual_seed(1)
    t = torch.randn(3, 9)
    permuted = t[:, torch.randperm(9)]
    assert torch.allclose(uld_distance(permuted, t), torch.zeros(3), atol=1e-6)
    assert bool((uld_distance(torch.zeros(3, 9), t) > 0.05).all())


# ---- byte-span -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_byte_span_on_one_tokenizer_is_ordinary_kd(kind: str) -> None:
    torch.manual_seed(2)
    s, t = torch.randn(6, 13), torch.randn(6, 13)
    projection = VocabularyProjection(torch.arange(13), 13, exact=13)
    got = byte_span_divergence(s, t, projection, kind, temperature=2.0)
    want = kd_divergence(s, t, kind, temperature=2.0)  # type: ignore[arg-type]
    assert torch.allclose(got, want, atol=1e-5)


def test_byte_span_projection_matches_a_direct_definition() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    # Teacher ids 0..5 go to student ids 2, 0, 0, 1, -1 (dropped), 2.
    projection = VocabularyProjection(torch.tensor([2, 0, 0, 1, -1, 2]), 3)
    temperature = 1.3
    got = byte_span_divergence(s, t, projection, "forward-kl", temperature)
    p_s, p_t = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    for r in range(4):
        kept = 1 - float(p_t[r, 4])
        q_t = [float(p_t[r, 1] + p_t[r, 2]) / kept, float(p_t[r, 3]) / kept, float(p_t[r, 0] + p_t[r, 5]) / kept]
        kl = sum(a * math.log(a / float(b)) for a, b in zip(q_t, p_s[r], strict=True))
        assert float(got[r]) == pytest.approx(kl * temperature**2, rel=1e-9)


def test_a_student_token_without_teacher_mass_gets_the_floor() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(2, 4), torch.randn(2, 3)
    projection = VocabularyProjection(torch.tensor([0, 1, 1]), 4)  # student ids 2 and 3 get nothing
    log_t = projection.project(F.log_softmax(t, -1))
    assert torch.allclose(log_t[:, 2:].exp(), torch.full((2, 2), PROJECTED_FLOOR))
    assert torch.allclose(log_t[:, :2].exp().sum(-1), torch.ones(2))
    for kind in KINDS:
        assert bool(torch.isfinite(byte_span_divergence(s, t, projection, kind, 1.0)).all())


def test_projection_by_bytes_exact_then_longest_prefix() -> None:
    student = {
        0: ("special", b"<pad>"),
        1: ("bytes", b" "),
        2: ("bytes", b" f"),
        3: ("bytes", b" fun"),
        4: ("bytes", b"c"),
    }
    teacher = {
        0: ("special", b"<pad>"),  # same special: itself
        1: ("bytes", b" func"),  # not in the student: its longest student prefix " fun"
        2: ("bytes", b"c"),
        3: ("special", b"<|eos|>"),  # a special the student lacks: dropped
        4: ("bytes", b"x"),  # no student token begins it: dropped
    }
    projection = VocabularyProjection.from_keys(student, teacher, 5, 5)
    assert projection.teacher_to_student.tolist() == [0, 3, 4, -1, -1]
    assert projection.exact == 2 and projection.dropped == 2


@pytest.mark.parametrize("method", ["uld", "byte-span"])
def test_gradients_reach_the_student_only(method: str) -> None:
    torch.manual_seed(4)
    s = torch.randn(5, 10, requires_grad=True)
    t = torch.randn(5, 12)
    projection = VocabularyProjection(torch.arange(12) % 10, 10)
    loss = CrossTokenizerKD(method, "forward-kl", projection)(s, t, 2.0).mean()
    loss.backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all()) and float(s.grad.abs().sum()) > 0
    # One plain gradient step lowers the loss: the gradient points the right way.
    with torch.no_grad():
        stepped = s - 0.5 * s.grad
    assert float(CrossTokenizerKD(method, "forward-kl", projection)(stepped, t, 2.0).mean()) < float(loss.detach())


def test_collate_cross_lays_out_teacher_tokens_and_positions() -> None:
    students = [TokenizedExample(7, [1, 2, 3], None), TokenizedExample(9, [4, 5], None)]
    cross = {7: CrossExample([10, 11], [0], [0]), 9: CrossExample([12, 13, 14, 15], [0], [2])}
    batch = collate_cross(students, cross, teacher_pad=0)
    assert batch["teacher_input_ids"].tolist() == [[10, 11, 0, 0], [12, 13, 14, 15]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["align_row"].tolist() == [0, 1]
    assert batch["align_student"].tolist() == [0, 0] and batch["align_teacher"].tolist() == [0, 2]
