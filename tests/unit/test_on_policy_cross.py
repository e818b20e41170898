"""On-policy scoring across tokenizers: the student's tokens become text, the teacher scores the
text, positions are aligned by bytes and the teacher's top tokens mapped to the student's ids.

- With the teacher's own tokenizer and text the tokenizer would cut the same way, the result is
  the one-tokenizer loss (every position aligns, every token maps to itself).
- With two different byte-level BPE tokenizers, the loss equals a float64 reference written from
  the definition at the aligned positions: buckets of the shared top tokens (same token string)
  and the tails 1 - sum, JSD_beta as in GKD.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.trainer.cross_tokenizer import aligned_positions, byte_offsets
from kdistill.trainer.local_teacher import LocalTeacher
from kdistill.trainer.on_policy import PendingBatch, loss_from_scores, send_to_teacher
from kdistill.trainer.on_policy_cross import TokenBridge
from tests.trainer import helpers


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    teacher = helpers.make_tokenizer(tmp_path_factory.mktemp("tok-teacher"), texts, vocab_size=300)
    # Other text and another size: merges of its own, so each side has tokens the other lacks.
    others = [p for _, p in helpers.pydoc_paragraphs(900)][500:]
    student = helpers.make_tokenizer(tmp_path_factory.mktemp("tok-student"), others, vocab_size=340)
    return student, teacher


def _gpt2(vocab: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2, initializer_range=0.3)
    return GPT2LMHeadModel(cfg).eval().double()


TEXTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "Names refer to objects. Names are introduced by name binding operations.",
    "A class definition defines a class object",
]


def _batch(tok: Any) -> tuple[list[list[int]], list[int]]:
    sequences = [tok(t)["input_ids"] for t in TEXTS]
    return sequences, [len(s) // 3 for s in sequences]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_one_tokenizer_through_text_equals_the_direct_loss(tokenizers: tuple[Any, Any], beta: float) -> None:
    _, tok = tokenizers
    student, teacher = _gpt2(len(tok), 0), _gpt2(len(tok), 1)
    service = LocalTeacher(teacher.float(), tok)
    sequences, prompts = _batch(tok)
    bridge = TokenBridge(tok, tok, len(tok))
    assert bridge.shared_tokens == len(tok)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sequences], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True)
    logits = student(input_ids=ids, attention_mask=mask).logits
    direct = PendingBatch(sequences, prompts, False, *send_to_teacher(service, sequences, 12, None))
    through_text = PendingBatch(sequences, prompts, False, *send_to_teacher(service, sequences, 12, bridge))
    assert through_text.texts is not None and [t.text for t in through_text.texts] == TEXTS
    want, n_direct = loss_from_scores(logits, direct, beta)
    got, n_text = loss_from_scores(logits, through_text, beta, bridge)
    assert n_text == n_direct == sum(len(s) - p for s, p in zip(sequences, prompts, strict=True))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _reference(
    logits: torch.Tensor,
    sequences: list[list[int]],
    prompts: list[int],
    s_tok: Any,
    t_tok: Any,
    teacher: torch.nn.Module,
    k: int,
    beta: float,
) -> tuple[torch.Tensor, int]:
    """From the definition: at each aligned completion position, the teacher's top-k tokens that
    the student's vocabulary holds as the same string, the tails 1 - sum, JSD_beta; the mean."""
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    t_name = {i: n for n, i in t_vocab.items()}
    terms = []
    for b, (seq, p_len) in enumerate(zip(sequences, prompts, strict=True)):
        text = s_tok.decode(seq)
        s_enc = s_tok(text, return_offsets_mapping=True)
        assert s_enc["input_ids"] == seq  # the test's texts are cut canonically
        t_enc = t_tok(text, return_offsets_mapping=True)
        t_logp = torch.log_softmax(teacher(torch.tensor([t_enc["input_ids"]])).logits[0].double(), dim=-1)
        s_pos, t_pos = aligned_positions(
            byte_offsets(s_enc["offset_mapping"], text), byte_offsets(t_enc["offset_mapping"], text), None
        )
        for i, j in zip(s_pos, t_pos, strict=True):
            if i + 1 < p_len:
                continue
            top = t_logp[j].detach().topk(k)
            pairs = [
                (s_vocab[t_name[int(t)]], float(v))
                for t, v in zip(top.indices, top.values, strict=True)
                if t_name[int(t)] in s_vocab
            ]
            if not pairs:
                continue
            q_all = torch.softmax(logits[b, i], dim=-1)
            p = torch.tensor([v for _, v in pairs], dtype=torch.float64).exp()
            q = q_all[[s for s, _ in pairs]]
            p = torch.cat([p, (1 - p.sum()).reshape(1)])
            q = torch.cat([q, (1 - q.sum()).reshape(1)])
            if beta == 0.0:
                terms.append((p * (p / q).log()).sum())
            elif beta == 1.0:
                terms.append((q * (q / p).log()).sum())
            else:
                m = beta * p + (1 - beta) * q
                terms.append(beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum())
    return torch.stack(terms).mean(), len(terms)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_two_tokenizers_match_the_reference_loss_and_gradient(tokenizers: tuple[Any, Any], beta: float) -> None:
    s_tok, t_tok = tokenizers
    student, teacher = _gpt2(len(s_tok), 2), _gpt2(len(t_tok), 3)
    service = LocalTeacher(teacher.float(), t_tok)
    bridge = TokenBridge(s_tok, t_tok, len(s_tok))
    assert 0 < bridge.shared_tokens < min(len(s_tok), len(t_tok))
    sequences, prompts = _batch(s_tok)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sequences], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True)
    logits = student(input_ids=ids, attention_mask=mask).logits.detach()
    pending = PendingBatch(sequences, prompts, False, *send_to_teacher(service, sequences, 10, bridge))

    got_logits = logits.clone().requires_grad_(True)
    got, count = loss_from_scores(got_logits, pending, beta, bridge)
    got.backward()
    ref_logits = logits.clone().requires_grad_(True)
    want, ref_count = _reference(ref_logits, sequences, prompts, s_tok, t_tok, teacher, 10, beta)
    want.backward()
    assert count == ref_count > 10
    # The teacher scored in float32 (as a server does): agreement to float32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_logits.grad is not None and ref_logits.grad is not None
    torch.testing.assert_close(got_logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)


def test_text_stops_at_the_first_invalid_byte(tokenizers: tuple[Any, Any]) -> None:
    s_tok, t_tok = tokenizers
    bridge = TokenBridge(s_tok, t_tok, len(s_tok))
    ids = s_tok("for x in y")["input_ids"]
    # A lone UTF-8 continuation byte (0x80) as a byte-level token: no text past it.
    lone = next(i for i, b in bridge.student_bytes.items() if b == b"\x80")
    text = bridge.text_of([*ids, lone, *ids])
    assert text.text == "for x in y" and len(text.offsets) == len(ids)
    assert bridge.text_of([*ids, s_tok.eos_token_id]).offsets[-1] == (10, 10)  # eos: no bytes


def test_bridge_maps_teacher_ids_by_bytes(tokenizers: tuple[Any, Any], tmp_path: Path) -> None:
    s_tok, t_tok = tokenizers
    bridge = TokenBridge(s_tok, t_tok, len(s_tok))
    s_vocab = s_tok.get_vocab()
    for name, t_id in list(t_tok.get_vocab().items())[:200]:
        mapped = int(bridge.map_teacher_ids(torch.tensor([t_id]))[0])
        assert mapped == s_vocab.get(name, -1)
    assert bridge.map_teacher_ids(torch.tensor([-1, 10_000])).tolist() == [-1, -1]
