"""Sequence packing: the layout, attention that never crosses examples (packed rows equal the
examples run one by one), and the packed step's loss and gradient equal to the padded path's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kdistill.trainer.batching import collate
from kdistill.trainer.data import TokenizedExample
from kdistill.trainer.losses import hard_label_ce, kd_divergence, kd_objective, topk_kd_divergence
from kdistill.trainer.objective import trained_rows
from kdistill.trainer.packed_step import PackedLogitsStep
from kdistill.trainer.packing import (
    MAX_PADDING_ONE_A_ROW,
    pack_examples,
    pack_or_pad,
    plan_rows,
    to_examples,
    to_packed,
)
from kdistill.trainer.targets import CacheStore
from kdistill.trainer.teacher_cache import TeacherCache

V, L = 40, 16
LENGTHS = [7, 16, 3, 1, 9, 5, 12, 2]
# Long examples: first-fit decreasing gives each a row of its own (the plain causal path).
ONE_PER_ROW = [16, 10, 15, 12]
# Near-equal lengths, as a length-grouped sampler makes them: one a row, rows as wide as the longest.
GROUPED = [10, 11, 12, 12]


def _examples(seed: int = 0, lengths: list[int] = LENGTHS) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    return [
        TokenizedExample(index=10 + i, input_ids=torch.randint(1, V, (n,), generator=g).tolist(), label=None)
        for i, n in enumerate(lengths)
    ]


def _gpt2(layers: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=L, n_embd=16, n_layer=layers, n_head=2, resid_pdrop=0.0)
    cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg).double().eval()


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=L,
    )
    return LlamaForCausalLM(cfg).double().eval()


def test_layout_rows_positions_labels_and_index() -> None:
    examples = _examples()
    batch = pack_examples(examples, pad_id=0, max_len=L)
    rows = batch["input_ids"].shape[0]
    assert batch["input_ids"].shape == (rows, L) and rows < len(examples)
    assert int(batch["attention_mask"].sum()) == sum(LENGTHS)
    # Every example lies contiguously in one row with positions 0..n-1 and its own tokens.
    for b, ((row, start), ex) in enumerate(zip(plan_rows(LENGTHS, L), examples, strict=True)):
        n = len(ex.input_ids)
        assert batch["input_ids"][row, start : start + n].tolist() == ex.input_ids
        assert batch["position_ids"][row, start : start + n].tolist() == list(range(n))
        assert batch["labels"][row, start].item() == -100  # never predicted across a boundary
        assert batch["labels"][row, start + 1 : start + n].tolist() == ex.input_ids[1:]
        assert batch["pack_index"][row, start : start + n].tolist() == [b * max(LENGTHS) + t for t in range(n)]
    # Trained rows: n - 1 per example, as when the examples run one by one.
    assert int(trained_rows(batch["labels"]).sum()) == sum(n - 1 for n in LENGTHS)
    assert batch["example_ids"].tolist() == [ex.index for ex in examples]
    with pytest.raises(ValueError):
        plan_rows([L + 1], L)


def test_pack_or_pad_lays_near_equal_lengths_one_a_row_and_packs_the_rest() -> None:
    grouped = pack_or_pad(_examples(3, GROUPED), pad_id=0, max_len=L)
    assert 1 - sum(GROUPED) / (len(GROUPED) * max(GROUPED)) <= MAX_PADDING_ONE_A_ROW
    assert grouped["input_ids"].shape == (len(GROUPED), max(GROUPED))  # narrower than max_len
    for b, n in enumerate(GROUPED):
        assert grouped["position_ids"][b, :n].tolist() == list(range(n))
        assert grouped["attention_mask"][b].tolist() == [1] * n + [0] * (max(GROUPED) - n)
        assert grouped["pack_index"][b, :n].tolist() == [b * max(GROUPED) + t for t in range(n)]
    assert int(trained_rows(grouped["labels"]).sum()) == sum(n - 1 for n in GROUPED)
    # Mixed lengths would waste over half the slots one a row: they are packed into max_len rows.
    mixed = pack_or_pad(_examples(), pad_id=0, max_len=L)
    plain = pack_examples(_examples(), pad_id=0, max_len=L)
    assert set(mixed) == set(plain) and all(torch.equal(mixed[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="empty batch"):
        pack_or_pad([], pad_id=0, max_len=L)


def test_to_packed_and_back_round_trip() -> None:
    batch = pack_examples(_examples(), pad_id=0, max_len=L)
    per_example = torch.randn(len(LENGTHS), max(LENGTHS), 3)
    for b, n in enumerate(LENGTHS):
        per_example[b, n:] = 0
    packed = to_packed(per_example, batch["pack_index"])
    assert packed.shape == (*batch["input_ids"].shape, 3)
    assert torch.equal(to_examples(packed, batch["pack_index"], len(LENGTHS), max(LENGTHS)), per_example)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_rows_attend_only_within_their_example(family: str) -> None:
    model = _gpt2(2, 0) if family == "gpt2" else _llama(0)
    examples = _examples(1)
    batch = pack_examples(examples, pad_id=0, max_len=L)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for (row, start), ex in zip(plan_rows(LENGTHS, L), examples, strict=True):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            got = packed[row, start : start + len(ex.input_ids)]
            assert torch.allclose(got, alone, atol=1e-5, rtol=0), (got - alone).abs().max()


def _padded_loss(student, teacher, examples, temperature, alpha, cached=None):
    batch = collate(examples, 0, "causal-lm")
    valid = trained_rows(batch["labels"])
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
    y = batch["labels"][:, 1:][valid]
    if cached is None:
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
        kd = kd_divergence(s, t, "forward-kl", temperature)
    else:

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x[:, :-1][valid]

        kd = topk_kd_divergence(
            s, rows(cached.values), rows(cached.indices), "forward-kl", temperature,
            teacher_logsumexp=rows(cached.logsumexp),
        )  # fmt: skip
    return kd_objective(kd, hard_label_ce(s, y), alpha)


@pytest.mark.parametrize(
    "lengths", [LENGTHS, ONE_PER_ROW, GROUPED], ids=["shared-rows", "one-per-row", "one-a-row-narrow"]
)
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_step_equals_padded_loss_and_gradient(use_cache: bool, lengths: list[int], tmp_path: Path) -> None:
    teacher, student = _gpt2(3, 1), _gpt2(2, 2)
    spec = SimpleNamespace(distillation=SimpleNamespace(alpha=0.6))
    store = CacheStore(TeacherCache(tmp_path, 8, V), 8) if use_cache else None
    step = PackedLogitsStep(spec, student, teacher, store)  # type: ignore[arg-type]
    examples = _examples(2, lengths)
    packed = pack_or_pad(examples, pad_id=0, max_len=L)  # what the trainer collates
    one_per_row = packed["input_ids"].shape[0] == len(examples)
    assert one_per_row == (lengths is not LENGTHS)
    loss, parts = step.micro_loss(packed, temperature=2.0)
    got = torch.autograd.grad(loss, list(student.parameters()))
    cached = store.lookup([ex.index for ex in examples]) if store is not None else None
    if use_cache:
        assert cached is not None  # the packed step filled the cache per example
        loss_again, _ = step.micro_loss(packed, temperature=2.0)  # now read from it
        assert abs(float(loss_again.detach()) - float(loss.detach())) < 1e-9
    ref = _padded_loss(student, teacher, examples, 2.0, 0.6, cached)
    want = torch.autograd.grad(ref, list(student.parameters()))
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-6
    assert set(parts) == {"kd", "ce", "logits"}
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
