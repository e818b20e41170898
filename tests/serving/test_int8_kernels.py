"""The served INT8 model under each dynamic-activation kernel: the same artifact loaded with the
oneDNN-packed kernel gives the fbgemm kernel's numbers (same activation quantization), close to
the float model, and the kernel can be forced for the server's process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.trainer import quantization as q
from kdistill.trainer.artifact import load_artifact, save_artifact
from tests.serving.helpers import build_tiny_tokenizer, tiny_bert_classifier, tiny_gpt2


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_onednn_kernel_matches_fbgemm_and_the_float_model(tmp_path: Path, family: str) -> None:
    tok = build_tiny_tokenizer(tmp_path / "tok")
    build = tiny_bert_classifier if family == "bert" else tiny_gpt2
    task = "sequence-classification" if family == "bert" else "causal-lm"
    fp32 = build(len(tok), seed=7)
    int8 = q.quantize_ptq_int8(build(len(tok), seed=7), "fbgemm-dynamic")
    out = save_artifact(int8, tok, tmp_path / "a" / "student-int8", task=task, quantization="ptq-int8", metrics={})
    ids = torch.randint(5, len(tok), (4, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = fp32(input_ids=ids).logits
        by_kernel = {
            k: load_artifact(out, kernel=k).model(input_ids=ids).logits  # type: ignore[arg-type]
            for k in ("fbgemm-dynamic", "onednn-dynamic")
        }
    err = {k: float((v - ref).norm() / ref.norm()) for k, v in by_kernel.items()}
    assert 0 < err["onednn-dynamic"] < 0.05  # quantized (not the float numbers), and close to them
    assert err["onednn-dynamic"] == pytest.approx(err["fbgemm-dynamic"], rel=0.1)
    # Per layer the two agree to float rounding; through a network the per-tensor requantization
    # can flip a few roundings, measured 0.3% apart at most.
    apart = float((by_kernel["onednn-dynamic"] - by_kernel["fbgemm-dynamic"]).norm() / ref.norm())
    assert apart < 0.01


def test_one_layer_is_the_same_on_both_engines() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    w = layer.weight.detach()
    scale = w.abs().amax(1) / 127
    qdata = torch.round(w / scale[:, None]).to(torch.int8)
    x = torch.randn(17, 64)
    fb = q.Int8Linear.from_int8(qdata, scale, layer.bias, "fbgemm-dynamic")
    one = q.Int8Linear.from_int8(qdata, scale, layer.bias, "onednn-dynamic")
    with torch.inference_mode():
        assert torch.allclose(fb(x), one(x), atol=1e-5)
        assert float((one(x) - layer(x)).norm() / layer(x).norm()) < 0.05


def test_the_onednn_kernel_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(q.KERNEL_ENV, "onednn-dynamic")
    assert q.select_int8_kernel() == "onednn-dynamic"
