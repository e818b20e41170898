"""The on-policy loss and its gradient against a float64 reference written from the definition.

The fixture is a fixed set of student samples: a tiny GPT-2 student, built from a config, samples
completions after fixed prompts (seeded); a second tiny GPT-2 plays the teacher and scores every
sequence as a server does (log-softmax, top-K). The reference works in probabilities: buckets
p (teacher) and q (student) over the teacher's K tokens and the tail 1 - Σ, the mixture
M = beta·p + (1 - beta)·q, and JSD_beta = beta·KL(p‖M) + (1 - beta)·KL(q‖M); KL(p‖q) at beta 0,
KL(q‖p) at beta 1; averaged over the completion tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kdistill.trainer.losses import kd_divergence
from kdistill.trainer.on_policy_loss import bucket_jsd, completion_mask, on_policy_loss

VOCAB = 37
# 0.5 weighs both sides alike; 0.3 shows which side beta weighs.
BETAS = [0.0, 0.3, 0.5, 1.0]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gpt2(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # A wide initialisation: peaked distributions, so divergences and tails are far from trivial.
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        initializer_range=0.5,
    )
    return GPT2LMHeadModel(cfg).eval().double()


@dataclass
class Samples:
    ids: torch.Tensor  # [B, L] right-padded with 0
    prompt_lengths: list[int]
    lengths: list[int]
    student_logits: torch.Tensor  # [B, L, V] float64, a leaf
    teacher_log_probs: list[torch.Tensor]  # [T_b, V] the teacher's full log-softmax, row t predicts token t


@pytest.fixture(scope="module")
def samples() -> Samples:
    student, teacher = _gpt2(0), _gpt2(1)
    g = torch.Generator().manual_seed(7)
    prompts = [[5, 9, 2], [11, 3], [7, 7, 8, 20], [4]]
    new_tokens = [6, 9, 3, 7]  # different completion lengths: the padding must not count
    seqs = []
    with torch.no_grad():
        for prompt, n in zip(prompts, new_tokens, strict=True):
            ids = list(prompt)
            for _ in range(n):  # the student's own samples, at temperature 1
                logits = student(torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=g)))
            seqs.append(ids)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        student_logits = student(ids, attention_mask=mask).logits
        teacher_log_probs = []
        for s in seqs:
            rows = F.log_softmax(teacher(torch.tensor([s])).logits[0], dim=-1)
            # Row t of a scored sequence is the distribution of token t; row 0 has no context.
            teacher_log_probs.append(torch.cat([torch.full((1, VOCAB), float("nan"), dtype=rows.dtype), rows[:-1]]))
    return Samples(ids, [len(p) for p in prompts], [len(s) for s in seqs], student_logits.detach(), teacher_log_probs)


def _top_k(full: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a server returns: the K largest log-probs of each row and their ids, most likely first."""
    ids = full.nan_to_num(0.0).topk(k, dim=-1).indices
    return ids, full.gather(-1, ids)


def _reference(samples: Samples, logits: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """The mean JSD_beta over completion tokens, from the definition, in float64 probabilities."""
    terms = []
    for b, (p_len, n) in enumerate(zip(samples.prompt_lengths, samples.lengths, strict=True)):
        for t in range(p_len, n):
            q_full = torch.softmax(logits[b, t - 1], dim=-1)  # the student's prediction of token t
            ids, lps = _top_k(samples.teacher_log_probs[b][t : t + 1], k)
            ids, lps = ids[0], lps[0]
            p = lps.exp()
            q = q_full[ids]
            if k < VOCAB:
                p = torch.cat([p, (1.0 - p.sum()).reshape(1)])
                q = torch.cat([q, (1.0 - q.sum()).reshape(1)])
            if beta == 0.0:
                terms.append((p * (p / q).log()).sum())
            elif beta == 1.0:
                terms.append((q * (q / p).log()).sum())
            else:
                m = beta * p + (1.0 - beta) * q
                terms.append(beta * (p * (p / m).log()).sum() + (1.0 - beta) * (q * (q / m).log()).sum())
    return torch.stack(terms).mean()


def _implementation(samples: Samples, logits: torch.Tensor, k: int, beta: float) -> tuple[torch.Tensor, int]:
    top = [_top_k(lp, k) for lp in samples.teacher_log_probs]
    return on_policy_loss(
        logits, [i for i, _ in top], [v for _, v in top], samples.prompt_lengths, samples.lengths, beta
    )


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [5, VOCAB])
def test_loss_and_gradient_match_the_float64_reference(samples: Samples, beta: float, k: int) -> None:
    ref_logits = samples.student_logits.clone().requires_grad_(True)
    ref = _reference(samples, ref_logits, k, beta)
    ref.backward()
    assert ref_logits.grad is not None
    assert float(ref.detach()) > 1e-2  # two different models: a real divergence, not a trivial zero

    logits = samples.student_logits.clone().requires_grad_(True)
    loss, count = _implementation(samples, logits, k, beta)
    loss.backward()
    assert count == sum(n - p for p, n in zip(samples.prompt_lengths, samples.lengths, strict=True))
    assert logits.grad is not None
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-9, atol=1e-12)
    # Rows that predict prompt tokens or padding get no gradient.
    trained = completion_mask(samples.prompt_lengths, samples.lengths, logits.shape[1])
    untrained = torch.ones(logits.shape[:2], dtype=torch.bool)
    untrained[:, :-1] = ~trained
    assert float(logits.grad[untrained].abs().max()) == 0.0

    # The float32 path the trainer runs agrees to float32 rounding.
    logits32 = samples.student_logits.float().requires_grad_(True)
    top = [_top_k(lp.float(), k) for lp in samples.teacher_log_probs]
    loss32, _ = on_policy_loss(
        logits32, [i for i, _ in top], [v for _, v in top], samples.prompt_lengths, samples.lengths, beta
    )
    loss32.backward()
    assert logits32.grad is not None
    torch.testing.assert_close(loss32.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits32.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reference_gradient_agrees_with_finite_differences(samples: Samples, beta: float) -> None:
    """The reference's own gradient (autograd in float64) is checked against central differences."""
    logits = samples.student_logits.clone().requires_grad_(True)
    _reference(samples, logits, 5, beta).backward()
    assert logits.grad is not None
    eps = 1e-6
    for b, t, v in [(0, 3, 0), (0, 5, 17), (1, 4, 36), (3, 2, 9), (2, 4, 1)]:
        plus, minus = samples.student_logits.clone(), samples.student_logits.clone()
        plus[b, t, v] += eps
        minus[b, t, v] -= eps
        numeric = (_reference(samples, plus, 5, beta) - _reference(samples, minus, 5, beta)) / (2 * eps)
        assert math.isclose(float(logits.grad[b, t, v]), float(numeric), rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.parametrize(("beta", "kind"), [(0.0, "forward-kl"), (1.0, "reverse-kl"), (0.5, "jsd")])
def test_whole_vocabulary_has_no_tail_and_equals_the_full_divergence(beta: float, kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, VOCAB, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, VOCAB, generator=g, dtype=torch.float64) * 2
    log_t = F.log_softmax(t, dim=-1)
    values, ids = log_t.topk(VOCAB, dim=-1)
    got = bucket_jsd(s, ids, values, beta)
    torch.testing.assert_close(got, kd_divergence(s, t, kind, 1.0), rtol=1e-10, atol=1e-12)


def test_the_tail_bucket_carries_the_mass_outside_the_top_k() -> None:
    """With K < V the result is the divergence over K+1 buckets, not over K renormalised tokens."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, VOCAB, generator=g, dtype=torch.float64)
    log_t = F.log_softmax(torch.randn(4, VOCAB, generator=g, dtype=torch.float64), dim=-1)
    values, ids = log_t.topk(3, dim=-1)
    got = bucket_jsd(s, ids, values, 0.0)
    p = torch.cat([values.exp(), 1 - values.exp().sum(-1, keepdim=True)], dim=-1)
    q_top = s.softmax(-1).gather(-1, ids)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], dim=-1)
    torch.testing.assert_close(got, (p * (p / q).log()).sum(-1), rtol=1e-10, atol=1e-12)
    renormalised = (values.softmax(-1) * (values.log_softmax(-1) - q_top.log().log_softmax(-1))).sum(-1)
    assert not torch.allclose(got, renormalised)


def test_chunked_rows_equal_one_chunk() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(50, VOCAB, generator=g, requires_grad=True)
    log_t = F.log_softmax(torch.randn(50, VOCAB, generator=g), dim=-1)
    values, ids = log_t.topk(8, dim=-1)
    whole = bucket_jsd(s, ids, values, 0.5, chunk_rows=1024)
    (grad_whole,) = torch.autograd.grad(whole.sum(), s)
    chunked = bucket_jsd(s, ids, values, 0.5, chunk_rows=7)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), s)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_a_batch_without_completion_tokens_is_a_connected_zero() -> None:
    logits = torch.randn(2, 4, VOCAB, requires_grad=True)
    top = [torch.zeros((4, 3), dtype=torch.long) + torch.arange(3), torch.zeros((4, 3)) - 2.0]
    loss, count = on_policy_loss(logits, [top[0], top[0]], [top[1], top[1]], [2, 3], [2, 3], 0.5)
    assert count == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, "onPolicy.beta"),
        ({"ids": [[0, 0]]}, "distinct"),
        ({"ids": [[0, VOCAB]]}, "out of the student's vocabulary"),
        ({"ids": [[0, 1, 2]]}, "must both be"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    ids = torch.tensor(kwargs.get("ids", [[0, 1]]))
    values = torch.full((1, 2), -1.0)
    with pytest.raises(ValueError, match=message):
        bucket_jsd(torch.zeros(1, VOCAB), ids, values, float(kwargs.get("beta", 0.5)))  # type: ignore[arg-type]
