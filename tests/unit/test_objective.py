"""The logits objective as a pure function: the same loss from every form of teacher targets
(full logits, logits at the trained rows, the cache's top-k with k = vocabulary), and the QAT
optimizer-state remap by parameter name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.trainer.objective import LogitsSettings, logits_objective, token_objective, trained_rows
from kdistill.trainer.optim import build_optimizer, in_group_order
from kdistill.trainer.quantization import remap_optimizer_state
from kdistill.trainer.targets import TeacherTargets


def _causal_batch(vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (3, 6), generator=gen)
    labels[1, 4:] = -100  # padding
    labels[2, 2:] = -100
    teacher = torch.randn(3, 6, vocab, generator=gen)
    student = torch.randn(3, 6, vocab, generator=gen, requires_grad=True)
    return labels, teacher, student


@pytest.mark.parametrize("beta", [None, 1.0])
def test_every_target_form_gives_the_same_causal_loss(beta: float | None) -> None:
    labels, teacher, student = _causal_batch()
    valid = trained_rows(labels)
    rows = student[:, :-1][valid]
    settings = LogitsSettings(divergence="forward-kl", alpha=0.7, entropy_beta=beta)
    values, indices = teacher.topk(teacher.shape[-1], dim=-1)
    forms = {
        "full": TeacherTargets(logits=teacher),
        "rows": TeacherTargets(logit_rows=teacher[:, :-1][valid]),
        "top-k": TeacherTargets(top_values=values, top_indices=indices, logsumexp=torch.logsumexp(teacher, -1)),
    }
    losses = {
        name: logits_objective(rows, labels, t, task="causal-lm", temperature=2.0, settings=settings)
        for name, t in forms.items()
    }
    reference, parts = losses["full"]
    assert set(parts) == {"kd", "ce"} and parts["kd"] > 0 and parts["ce"] > 0
    torch.testing.assert_close(losses["rows"][0], reference, atol=1e-5, rtol=1e-5)
    # The KD and CE rows agree in every form; the loss too unless entropy weighting is on, whose
    # entropy from the cache is over k+1 buckets (normalised by their count), not the vocabulary.
    assert losses["top-k"][1] == pytest.approx(parts, rel=1e-5)
    if beta is None:
        torch.testing.assert_close(losses["top-k"][0], reference, atol=1e-5, rtol=1e-5)
    # alpha = 1 drops the hard labels; alpha = 0 is plain cross-entropy.
    ce_only, _ = logits_objective(
        rows, labels, forms["full"], task="causal-lm", temperature=2.0, settings=LogitsSettings("forward-kl", 0.0)
    )
    torch.testing.assert_close(ce_only, nn.functional.cross_entropy(rows, labels[:, 1:][valid]))


@pytest.mark.parametrize("beta", [None, 1.0])
def test_classifier_cache_entry_gives_the_full_logits_loss(beta: float | None) -> None:
    """A classifier's cached entry is one position per sample ([B, 1, k] values, [B, 1]
    log-sum-exp): with k = the label count it gives the loss of the full class logits."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 3, generator=gen) * 3
    student = torch.randn(4, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    settings = LogitsSettings(divergence="forward-kl", alpha=0.7, entropy_beta=beta)
    values, indices = teacher.unsqueeze(1).topk(3, dim=-1)
    cached = TeacherTargets(
        top_values=values, top_indices=indices, logsumexp=torch.logsumexp(teacher, -1, keepdim=True)
    )
    full, full_parts = logits_objective(
        student,
        labels,
        TeacherTargets(logits=teacher),
        task="sequence-classification",
        temperature=2.0,
        settings=settings,
    )
    got, parts = logits_objective(
        student, labels, cached, task="sequence-classification", temperature=2.0, settings=settings
    )
    assert parts == pytest.approx(full_parts, rel=1e-5)
    if beta is None:  # weighting reads k+1 buckets from the cache, not the label count
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_token_objective_matches_the_row_objective_on_valid_tokens() -> None:
    labels, teacher, student = _causal_batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    settings = LogitsSettings(divergence="jsd", alpha=0.5)
    per_token, sums = token_objective(student, teacher, shifted, temperature=1.5, settings=settings)
    assert per_token.shape == shifted.shape
    valid = shifted != -100
    assert sums[2] == valid.sum()
    valid_rows = trained_rows(labels)
    row_loss, parts = logits_objective(
        student[:, :-1][valid_rows],
        labels,
        TeacherTargets(logits=teacher),
        task="causal-lm",
        temperature=1.5,
        settings=settings,
    )
    torch.testing.assert_close(per_token[valid].mean(), row_loss)
    assert float(sums[0] / sums[2]) == pytest.approx(parts["kd"], rel=1e-5)


def test_remap_moves_adam_state_by_name_into_a_rebuilt_optimizer() -> None:
    from kdistill.api.spec import Distillation

    torch.manual_seed(0)
    a, b, bias = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(3))
    settings = Distillation.model_validate({"learningRate": 1e-3, "warmupSteps": 0})
    before = [("a", a), ("bias", bias), ("b", b)]
    optimizer, scheduler = build_optimizer(before, settings, total_steps=10)
    for p in (a, b, bias):
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    # "b" is replaced by a new Parameter object (as a fake-quant wrapper does), "a" kept.
    b2 = nn.Parameter(b.detach().clone())
    after = [("b", b2), ("a", a), ("bias", bias)]
    rebuilt, _ = build_optimizer(after, settings, total_steps=10)
    remap_optimizer_state(
        optimizer, [n for n, _ in in_group_order(before)], rebuilt, [n for n, _ in in_group_order(after)]
    )
    for old, new in ((a, a), (b, b2), (bias, bias)):
        torch.testing.assert_close(rebuilt.state[new]["exp_avg"], optimizer.state[old]["exp_avg"])
    assert [g["lr"] for g in rebuilt.param_groups] == [g["lr"] for g in optimizer.param_groups]
