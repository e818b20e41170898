"""Entropy-based sample weights: direct formula, confident rows weigh more, mean 1, masks."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.trainer.weighting import sample_entropy_weights


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), dim=-1)
    return -(p * p.log()).sum(-1)


def test_matches_direct_formula_and_has_mean_one() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g) * torch.linspace(0.2, 4.0, 6)[:, None]
    w = sample_entropy_weights(logits, beta=0.5)
    raw = 1 - (_entropy(logits) / math.log(10)) ** 0.5
    torch.testing.assert_close(w.double(), raw / raw.mean(), rtol=1e-5, atol=1e-6)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)


def test_confident_teacher_rows_weigh_more() -> None:
    confident = torch.tensor([8.0, 0.0, 0.0, 0.0])
    unsure = torch.tensor([0.5, 0.4, 0.3, 0.2])
    w = sample_entropy_weights(torch.stack([unsure, confident, (confident + unsure) / 2]), beta=1.0)
    assert float(w[1]) > float(w[2]) > float(w[0])
    # A larger beta pushes weights of mid-entropy rows up (the power of a ratio below 1 shrinks).
    logits = torch.stack([unsure, confident])
    lo, hi = sample_entropy_weights(logits, beta=0.25), sample_entropy_weights(logits, beta=4.0)
    assert float(hi[0]) > float(lo[0])


def test_sequence_weights_average_only_valid_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    w = sample_entropy_weights(logits, beta=0.5, mask=mask)
    h = torch.stack([_entropy(logits[b][mask[b].bool()]).mean() for b in range(3)])
    raw = 1 - (h / math.log(7)) ** 0.5
    torch.testing.assert_close(w.double(), raw / raw.mean(), rtol=1e-5, atol=1e-6)
    # Padding logits do not matter.
    noisy = logits.clone()
    noisy[~mask.bool()] = torch.randn(int((~mask.bool()).sum()), 7, generator=g) * 50
    torch.testing.assert_close(sample_entropy_weights(noisy, 0.5, mask), w)


def test_empty_samples_and_uniform_teachers() -> None:
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    w = sample_entropy_weights(logits, 1.0, mask)
    assert float(w[1]) == 0.0
    assert float(w[[0, 2]].mean()) == pytest.approx(1.0, abs=1e-6)
    # A uniform teacher everywhere gives every raw weight 0: fall back to equal weights.
    assert torch.equal(sample_entropy_weights(torch.zeros(4, 9), 0.5), torch.ones(4))


def test_weights_carry_no_gradient_and_reject_bad_input() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    assert not sample_entropy_weights(logits, 0.5).requires_grad
    with pytest.raises(ValueError, match="beta"):
        sample_entropy_weights(logits, 0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        sample_entropy_weights(torch.zeros(3, 1), 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        sample_entropy_weights(torch.zeros(2, 3, 5), 0.5, mask=torch.ones(2, 4))
