"""The compiled chunk function of the fused head + loss, and the packed step with compiled
backbones, give what the eager ones give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdistill.trainer import compile as kd_compile
from kdistill.trainer.data import TokenizedExample
from kdistill.trainer.fused_head_loss import TeacherHead, TopKTeacher, fused_head_kd_loss
from kdistill.trainer.packed_step import PackedLogitsStep
from kdistill.trainer.packing import pack_examples


def _loss(teacher: object, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    loss, kd, ce = fused_head_kd_loss(hidden, weight, None, teacher, labels, alpha=0.7, temperature=2.0, chunk_rows=24)
    grads = torch.autograd.grad(loss, [hidden, weight])
    return [loss.detach(), kd, ce, *grads]


def test_compiled_chunks_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(64, 16, generator=g)).requires_grad_()
    labels = torch.randint(64, (50,), generator=g)
    t_hidden, t_weight = torch.randn(50, 8, generator=g), torch.randn(64, 8, generator=g)
    values, indices = (t_hidden @ t_weight.t()).topk(16, dim=-1)
    lse = (t_hidden @ t_weight.t()).logsumexp(-1)
    teachers = [TeacherHead(t_hidden, t_weight), TopKTeacher(values, indices, lse)]
    monkeypatch.setenv("KDISTILL_COMPILE", "0")
    eager = [_loss(t, hidden, weight, labels) for t in teachers]
    monkeypatch.setenv("KDISTILL_COMPILE", "1")
    compiled = [_loss(t, hidden, weight, labels) for t in teachers]
    for want, got in zip(eager, compiled, strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_switch_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDISTILL_COMPILE", raising=False)
    assert not kd_compile.compile_enabled()
    monkeypatch.setenv("KDISTILL_COMPILE", "yes")
    with pytest.raises(ValueError, match="KDISTILL_COMPILE"):
        kd_compile.compile_enabled()


def _gpt2(layers: int, seed: int, vocab: int, max_len: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=16, n_layer=layers, n_head=2)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0  # deterministic: eager and compiled agree
    return GPT2LMHeadModel(cfg)


def test_compiled_backbones_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed step's loss and student gradients with compiled teacher and student backbones on
    rows shared by several examples: under compilation transformers always builds the packed
    (block-diagonal) mask. One example a row runs the plain causal kernel, as eagerly
    (tests/unit/test_packing.py); it is left out here to keep the compile time down."""
    vocab, max_len = 48, 16
    teacher, student = _gpt2(2, 1, vocab, max_len).eval(), _gpt2(1, 2, vocab, max_len).train()
    spec = SimpleNamespace(distillation=SimpleNamespace(alpha=0.7))
    g = torch.Generator().manual_seed(4)
    layouts = [[7, 16, 3, 1, 9, 5, 12, 2]]
    batches = [
        pack_examples(
            [TokenizedExample(i, torch.randint(1, vocab, (n,), generator=g).tolist(), None) for i, n in enumerate(ns)],
            pad_id=0,
            max_len=max_len,
        )
        for ns in layouts
    ]
    assert batches[0]["input_ids"].shape[0] < len(layouts[0])  # rows shared by several examples

    def run() -> tuple[list[list[torch.Tensor]], PackedLogitsStep]:
        step = PackedLogitsStep(spec, student, teacher, None)  # type: ignore[arg-type]
        out = []
        for batch in batches:
            loss, _ = step.micro_loss(batch, temperature=2.0)
            out.append([loss.detach(), *torch.autograd.grad(loss, list(student.parameters()))])
        return out, step

    monkeypatch.setenv("KDISTILL_COMPILE", "0")
    eager, step = run()
    assert step.student_forward is step.s_backbone  # eager: the module itself
    monkeypatch.setenv("KDISTILL_COMPILE", "1")
    compiled, step = run()
    for call in (step.student_forward, step.teacher_forward):  # compiled, with no eager fallback
        assert isinstance(call, kd_compile.CompiledCall) and not call.broken
    for want, got in zip(eager, compiled, strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
