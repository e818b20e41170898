"""fuse_activations: the fused tanh-GELU computes what transformers' composed one does."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import FastGELUActivation, NewGELUActivation

from kdistill.trainer.fused_ops import FusedTanhGELU, fuse_activations


def test_fused_gelu_matches_composed_values_and_gradients() -> None:
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    for composed in (NewGELUActivation(), FastGELUActivation()):
        ref = composed(x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        out = FusedTanhGELU()(x)
        (g_out,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g_out, g_ref, rtol=1e-8, atol=1e-8)


def test_fuse_activations_swaps_every_gelu_and_keeps_outputs_and_state() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=4)).eval()
    ids = torch.randint(97, (2, 11))
    before = model(input_ids=ids).logits
    keys = set(model.state_dict())
    assert fuse_activations(model) == 3
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, FusedTanhGELU) for m in model.modules()) == 3
    assert set(model.state_dict()) == keys  # nothing saved changes
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert fuse_activations(model) == 0  # idempotent
