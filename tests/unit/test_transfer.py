"""Hidden-state and low-rank attention transfer, and q/k/v capture on tiny real models."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from kdistill.trainer.attention_transfer import LowRankAttentionTransfer, orthonormal_projection, relation_kl
from kdistill.trainer.hidden_transfer import HiddenStateTransfer, resolve_layer_map
from kdistill.trainer.qkv_capture import QKVCapture

VOCAB = 100


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add wake-up latency (large on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gpt2(width: int, heads: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=32)
    ).eval()


def llama(width: int, heads: int, kv_heads: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=2 * width,
            vocab_size=VOCAB,
            max_position_embeddings=32,
        )
    ).eval()


def bert(width: int, heads: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=2 * width,
            vocab_size=VOCAB,
            max_position_embeddings=32,
        )
    ).eval()


def roberta(width: int, heads: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return RobertaForSequenceClassification(
        RobertaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=heads,
            intermediate_size=2 * width,
            vocab_size=VOCAB,
            max_position_embeddings=40,
            pad_token_id=1,
        )
    ).eval()


def distilbert(width: int, heads: int, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(
        DistilBertConfig(
            n_layers=layers,
            dim=width,
            n_heads=heads,
            hidden_dim=2 * width,
            vocab_size=VOCAB,
            max_position_embeddings=32,
        )
    ).eval()


def batch(b: int = 3, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 6:] = 0  # right padding on the first sample
    mask[1, 8:] = 0
    return ids, mask


# ---- layer map --------------------------------------------------------------------------------


def test_layer_map_evenly_spaced_and_explicit() -> None:
    assert resolve_layer_map(2, 4, None) == [(0, 1), (1, 3)]
    assert resolve_layer_map(4, 12, []) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert resolve_layer_map(3, 3, None) == [(0, 0), (1, 1), (2, 2)]
    assert resolve_layer_map(4, 2, None) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    assert resolve_layer_map(2, 6, [(0, 5), (1, 0)]) == [(0, 5), (1, 0)]
    with pytest.raises(ValueError, match=r"\(student=2, teacher=1\): student layer must be in \[0, 2\)"):
        resolve_layer_map(2, 4, [(0, 0), (2, 1)])
    with pytest.raises(ValueError, match=r"\(student=0, teacher=4\): teacher layer"):
        resolve_layer_map(2, 4, [(0, 4)])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_layer_map(2, 4, [(0, 1), (0, 1)])


# ---- hidden-state transfer --------------------------------------------------------------------


def test_hidden_transfer_is_masked_mse_through_the_projection() -> None:
    g = torch.Generator().manual_seed(0)
    s_hidden = tuple(torch.randn(2, 5, 6, generator=g) for _ in range(3))
    t_hidden = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    module = HiddenStateTransfer(6, 8, [(0, 1), (1, 3)])
    loss = module(s_hidden, t_hidden, mask)
    want = []
    for (s, t), proj in zip(module.pairs, module.projections, strict=True):
        diff = (proj(s_hidden[s + 1]) - t_hidden[t + 1]).pow(2).mean(-1)
        want.append(diff[mask.bool()].mean())
    torch.testing.assert_close(loss, torch.stack(want).mean())
    # Padding positions do not count.
    t_noisy = tuple(t.masked_fill(~mask.bool()[..., None], 1e3) for t in t_hidden)
    torch.testing.assert_close(module(s_hidden, t_noisy, mask), loss)


def test_hidden_transfer_identity_when_widths_agree_and_learns_when_not() -> None:
    same = HiddenStateTransfer(8, 8, [(0, 0)])
    assert isinstance(same.projections[0], nn.Identity) and not list(same.parameters())
    h = (torch.zeros(1, 3, 8), torch.ones(1, 3, 8))
    assert float(same(h, h, torch.ones(1, 3))) == 0.0

    teacher, student = gpt2(32, 4), gpt2(16, 2)
    ids, mask = batch()
    with torch.no_grad():
        t_hidden = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        s_hidden = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    module = HiddenStateTransfer(16, 32, resolve_layer_map(2, 2, None))
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = module(s_hidden, t_hidden, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[0]) and losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateTransfer(16, 32, [(5, 0)])(s_hidden, t_hidden, mask)


# ---- q/k/v capture ----------------------------------------------------------------------------

CAPTURE_CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, int, int]]] = [
    ("gpt2", lambda: gpt2(32, 4), (32, 32, 32)),
    ("llama-gqa", lambda: llama(32, 4, 2), (32, 16, 16)),
    ("bert", lambda: bert(32, 4), (32, 32, 32)),
    ("roberta", lambda: roberta(32, 4), (32, 32, 32)),
    ("distilbert", lambda: distilbert(32, 4), (32, 32, 32)),
]


@pytest.mark.parametrize(("name", "build", "dims"), CAPTURE_CASES, ids=[c[0] for c in CAPTURE_CASES])
def test_capture_shapes_and_hooks_removed(
    name: str, build: Callable[[], nn.Module], dims: tuple[int, int, int]
) -> None:
    model = build()
    ids, mask = batch()
    with torch.no_grad(), QKVCapture(model, [0, 1]) as cap:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(cap.qkv) == [0, 1]
    for layer in (0, 1):
        q, k, v = cap.qkv[layer]
        assert (q.shape, k.shape, v.shape) == tuple(torch.Size((3, 9, d)) for d in dims)
        assert not torch.equal(q, k) and not torch.equal(k, v)
    # Hooks are gone: another forward leaves the capture untouched.
    before = cap.qkv[0][0]
    with torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])
    assert cap.qkv[0][0] is before
    assert all(not m._forward_hooks for m in model.modules())


def test_captured_q_is_the_projection_output() -> None:
    # Llama layer 0: q = q_proj(input_layernorm(embed(ids))); GPT-2 layer 0: c_attn(ln_1(wte + wpe))[:d].
    ids, mask = batch()
    model = llama(32, 4, 2)
    with torch.no_grad(), QKVCapture(model, [0]) as cap:
        model(input_ids=ids, attention_mask=mask)
        layer = model.model.layers[0]
        q = layer.self_attn.q_proj(layer.input_layernorm(model.model.embed_tokens(ids)))
    torch.testing.assert_close(cap.qkv[0][0], q)
    g = gpt2(32, 4)
    with torch.no_grad(), QKVCapture(g, [0]) as cap:
        g(input_ids=ids, attention_mask=mask)
        x = g.transformer.wte(ids) + g.transformer.wpe(torch.arange(9))
        qkv = g.transformer.h[0].attn.c_attn(g.transformer.h[0].ln_1(x))
    torch.testing.assert_close(cap.qkv[0][2], qkv[..., 64:])


def test_capture_rejects_unknown_architectures_and_layers() -> None:
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="does not know the architecture Mystery"):
        QKVCapture(Mystery(), [0])
    with pytest.raises(ValueError, match="layer 2 is out of range: GPT2LMHeadModel has 2"):
        QKVCapture(gpt2(16, 2), [2])


# ---- low-rank attention transfer --------------------------------------------------------------


def test_orthonormal_projection_preserves_gram_matrices() -> None:
    gen = torch.Generator().manual_seed(0)
    wide = orthonormal_projection(12, 20, gen)  # r >= d: exact
    assert wide.shape == (12, 20)
    torch.testing.assert_close(wide @ wide.T, torch.eye(12), atol=1e-5, rtol=0)
    narrow = orthonormal_projection(40, 8, gen)  # r < d: JL-scaled orthonormal columns
    torch.testing.assert_close(narrow.T @ narrow, torch.eye(8) * 5.0, atol=1e-4, rtol=0)
    # Seeded: the same generator state gives the same matrix.
    first = orthonormal_projection(40, 8, torch.Generator().manual_seed(5))
    assert torch.equal(first, orthonormal_projection(40, 8, torch.Generator().manual_seed(5)))
    a = LowRankAttentionTransfer((8, 8, 8), (12, 12, 12), 4, [(0, 0)], seed=3)
    b = LowRankAttentionTransfer((8, 8, 8), (12, 12, 12), 4, [(0, 0)], seed=3)
    assert torch.equal(a.teacher_projection(0, 1), b.teacher_projection(0, 1))


def test_relation_kl_matches_direct_formula_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rows = relation_kl(s, t, 0.5, 0.3, mask)
    for b in range(2):
        n = int(mask[b].sum())
        rs = torch.softmax(s[b, :n] @ s[b, :n].T * 0.5, -1)
        rt = torch.softmax(t[b, :n] @ t[b, :n].T * 0.3, -1)
        torch.testing.assert_close(rows[b, :n], (rt * (rt / rs).log()).sum(-1))
    s2 = s.clone()
    s2[0, 3:] = 99.0
    torch.testing.assert_close(relation_kl(s2, t, 0.5, 0.3, mask)[0, :3], rows[0, :3])


def test_gradcheck_transfer_losses() -> None:
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    s = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    assert gradcheck(lambda a: relation_kl(a, t, 0.7, 0.4, mask), (s,), fast_mode=True)
    attn = LowRankAttentionTransfer((3, 3, 3), (5, 5, 5), 2, [(0, 0)], seed=0).double()
    assert gradcheck(lambda a: attn([(a, a * 2, a - 1)], [(t, t, t)], mask), (s,), fast_mode=True)
    hidden = HiddenStateTransfer(3, 5, [(0, 0)]).double()
    assert gradcheck(lambda a: hidden((a, a), (t, t), mask), (s,), fast_mode=True)


def test_attention_loss_is_zero_when_the_student_reproduces_the_teacher_relation() -> None:
    d, r = 16, 4
    module = LowRankAttentionTransfer((d, d, d), (d, d, d), r, [(0, 0)], seed=0)
    with torch.no_grad():
        for x in range(3):
            # Student logits XWᵀWXᵀ/√r equal teacher logits XPPᵀXᵀ/√d when Wᵀ = P·(r/d)^(1/4).
            module.student_proj[0][x].weight.copy_((module.teacher_projection(0, x) * (r / d) ** 0.25).T)
    g = torch.Generator().manual_seed(2)
    qkv = tuple(torch.randn(2, 6, d, generator=g) for _ in range(3))
    mask = torch.ones(2, 6)
    assert abs(float(module([qkv], [qkv], mask).detach())) < 1e-5
    other = tuple(torch.randn(2, 6, d, generator=g) for _ in range(3))
    assert float(module([other], [qkv], mask).detach()) > 1e-3


TRANSFER_CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], nn.Module]]] = [
    ("gpt2", lambda: gpt2(48, 4, layers=3), lambda: gpt2(16, 2)),
    ("llama", lambda: llama(48, 6, 2, layers=3), lambda: llama(16, 2, 1)),
    ("bert-to-distilbert", lambda: bert(48, 4, layers=3), lambda: distilbert(16, 2)),
]


@pytest.mark.parametrize(("name", "teacher_fn", "student_fn"), TRANSFER_CASES, ids=[c[0] for c in TRANSFER_CASES])
def test_attention_transfer_across_widths_and_heads_learns(
    name: str, teacher_fn: Callable[[], nn.Module], student_fn: Callable[[], nn.Module]
) -> None:
    teacher, student = teacher_fn(), student_fn()
    pairs = resolve_layer_map(2, 3, None)
    ids, mask = batch()
    with torch.no_grad(), QKVCapture(teacher, [t for _, t in pairs]) as t_cap:
        teacher(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), QKVCapture(student, [s for s, _ in pairs]) as s_cap:
        student(input_ids=ids, attention_mask=mask)
    t_qkv = [t_cap.qkv[t] for _, t in pairs]
    s_qkv = [s_cap.qkv[s] for s, _ in pairs]
    dims = lambda qkv: tuple(int(x.shape[-1]) for x in qkv[0])  # noqa: E731
    module = LowRankAttentionTransfer(dims(s_qkv), dims(t_qkv), rank=8, pairs=pairs, seed=0)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(12):
        loss = module(s_qkv, t_qkv, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) and x >= 0 for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    # Teacher projections are fixed; only the student's are trained.
    trained = {n for n, _ in module.named_parameters()}
    assert trained == {f"student_proj.{p}.{x}.weight" for p in range(2) for x in range(3)}


def test_attention_transfer_rejects_mismatched_inputs() -> None:
    module = LowRankAttentionTransfer((8, 8, 8), (12, 6, 6), 4, [(0, 0)], seed=0)
    good_s = tuple(torch.zeros(1, 3, 8) for _ in range(3))
    bad_t = (torch.zeros(1, 3, 12), torch.zeros(1, 3, 12), torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match=r"k: widths 8 \(student\) / 12 \(teacher\)"):
        module([good_s], [bad_t], torch.ones(1, 3))
    with pytest.raises(ValueError, match="rank"):
        LowRankAttentionTransfer((8, 8, 8), (8, 8, 8), 0, [(0, 0)], seed=0)
