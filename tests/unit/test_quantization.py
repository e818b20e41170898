"""QAT / INT8 conversion and the safe artifact, on tiny real transformers models."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdistill.trainer import quantization as q
from kdistill.trainer.artifact import ArtifactError, load_artifact, save_artifact
from tests.serving.helpers import LABELS, build_tiny_tokenizer, tiny_bert_classifier, tiny_gpt2

KERNELS = ["torchao-dynamic", "fbgemm-dynamic", "weight-only"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def ids(vocab: int, batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---- phases -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "frac", "expected"),
    [(500, 0.25, (125, 375)), (0, 0.5, (0, 0)), (10, 1.0, (10, 0)), (10, 0.0, (0, 10)), (3, 0.5, (2, 1))],
)
def test_qat_phase_split(steps: int, frac: float, expected: tuple[int, int]) -> None:
    assert q.qat_phase_split(steps, frac) == expected


@pytest.mark.parametrize(("steps", "frac"), [(-1, 0.5), (10, 1.5), (10, -0.1)])
def test_qat_phase_split_rejects_bad_values(steps: int, frac: float) -> None:
    with pytest.raises(ValueError, match=r"qat_steps|reducedPrecisionFraction"):
        q.qat_phase_split(steps, frac)


def test_reduced_precision_autocast_runs_bf16_on_cpu() -> None:
    layer = nn.Linear(8, 4)
    with q.reduced_precision_autocast(torch.device("cpu")):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


# ---- QAT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_prepare_qat_keeps_parameters_and_fake_quantizes_backbone_only(family: str) -> None:
    model = tiny_gpt2(300) if family == "gpt2" else tiny_bert_classifier(300)
    x = ids(300)
    ref = model(x).logits
    before = dict(model.named_parameters())
    q.prepare_qat(model.train())
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    from torchao.quantization.qat import FakeQuantizedLinear

    wrapped = [n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear | q.FakeQuantizedConv1D)]
    assert len(wrapped) == (4 * 2 if family == "gpt2" else 6 * 2 + 1)  # + BERT's pooler
    head = model.lm_head if family == "gpt2" else model.classifier
    assert type(head) is nn.Linear
    out = model.eval()(x).logits
    assert 0 < rel_err(out, ref) < 0.05  # fake quantization changes the outputs, a little
    model.train()(x).logits.float().pow(2).mean().backward()
    first = (
        model.transformer.h[0].attn.c_attn.weight
        if family == "gpt2"
        else model.bert.encoder.layer[0].attention.self.query.weight
    )
    assert first.grad is not None and first.grad.abs().sum() > 0  # straight-through gradients reach weights


def test_strip_fake_quant_restores_the_float_model_exactly() -> None:
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2(300)
    x = ids(300)
    ref = model(x).logits
    stripped = q.strip_fake_quant(q.prepare_qat(copy.deepcopy(model)))
    assert type(stripped.transformer.h[1].mlp.c_fc) is Conv1D
    assert torch.equal(stripped.eval()(x).logits, ref)
    # save_pretrained layout unchanged: same keys and shapes as the original
    assert {k: v.shape for k, v in stripped.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_matches_dequantized_reference(kernel: q.Int8Kernel) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    model = nn.Sequential(layer)
    model.base_model_prefix = ""  # a bare module is its own backbone
    x = torch.randn(5, 7, 64)
    int8 = q.quantize_ptq_int8(copy.deepcopy(model), kernel)[0]
    assert isinstance(int8, q.Int8Linear) and int8.kernel == kernel
    assert int8.weight_int8.dtype == torch.int8
    assert (int8.dequantized_weight() - layer.weight).abs().max() <= int8.weight_scale.max() / 2 + 1e-6
    reference = x @ int8.dequantized_weight().t() + int8.bias
    with torch.inference_mode():
        out = int8(x)
    assert out.shape == (5, 7, 32)
    tolerance = 1e-5 if kernel == "weight-only" else 0.03  # dynamic activations add their own rounding
    assert rel_err(out, reference) < tolerance


@pytest.mark.parametrize("kernel", KERNELS)
def test_convert_qat_to_int8_keeps_heads_float_and_tied(kernel: q.Int8Kernel) -> None:
    model = tiny_gpt2(300)
    x = ids(300)
    ref = model(x).logits
    int8 = q.convert_qat_to_int8(q.prepare_qat(copy.deepcopy(model)), kernel)
    assert len(q.int8_modules(int8)) == 8
    assert type(int8.lm_head) is nn.Linear and int8.lm_head.weight is int8.transformer.wte.weight
    with torch.inference_mode():
        out = int8(x).logits
    assert rel_err(out, ref) < 0.05


def test_bert_classifier_quantizes_pooler_not_classifier() -> None:
    model = tiny_bert_classifier(300)
    int8 = q.quantize_ptq_int8(copy.deepcopy(model))
    names = q.int8_modules(int8)
    assert "bert.pooler.dense" in names and not any(n.startswith("classifier") for n in names)
    assert type(int8.classifier) is nn.Linear


def test_kernel_selection_follows_cpu_features_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = q.cpu_int8_features()
    expected = (
        "onednn-dynamic"
        if (feats["amx"] or feats["vnni"]) and "onednn" in feats["quantized_engines"]
        else "fbgemm-dynamic"
        if feats["avx2"] and "fbgemm" in feats["quantized_engines"]
        else "weight-only"
    )
    monkeypatch.delenv(q.KERNEL_ENV, raising=False)
    assert q.select_int8_kernel() == expected
    monkeypatch.setenv(q.KERNEL_ENV, "weight-only")
    assert q.select_int8_kernel() == "weight-only"
    monkeypatch.setenv(q.KERNEL_ENV, "fast-please")
    with pytest.raises(ValueError, match="KDISTILL_INT8_KERNEL"):
        q.select_int8_kernel()


# ---- artifact ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "quantization"),
    [("causal-lm", "qat-int8"), ("sequence-classification", "ptq-int8"), ("causal-lm", "none")],
)
def test_artifact_round_trip_gives_identical_outputs(
    tmp_path: Path, tokenizer: Any, task: str, quantization: str
) -> None:
    vocab = len(tokenizer)
    model = tiny_gpt2(vocab) if task == "causal-lm" else tiny_bert_classifier(vocab)
    if quantization == "qat-int8":
        model = q.convert_qat_to_int8(q.prepare_qat(model))
    elif quantization == "ptq-int8":
        model = q.quantize_ptq_int8(model)
    out = save_artifact(
        model,
        tokenizer,
        tmp_path / "student-int8",
        task=task,
        quantization=quantization,
        metrics={"metric": "accuracy", "retention": 0.97},
    )
    assert not (tmp_path / "student-int8.tmp").exists()
    meta = json.loads((out / "kdistill.json").read_text())
    assert meta["task"] == task and meta["quantization"]["mode"] == quantization
    assert meta["metrics"]["retention"] == 0.97 and meta["kdistill_version"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(meta["files"])
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles at all
    loaded = load_artifact(out)
    x = ids(vocab)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x).logits, model(x).logits)
    assert loaded.tokenizer("def f(x): return x")["input_ids"] == tokenizer("def f(x): return x")["input_ids"]
    if task == "causal-lm":
        assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    else:
        assert loaded.model.config.id2label[0] == LABELS[0]


@pytest.fixture
def saved(tmp_path: Path, tokenizer: Any) -> Path:
    model = q.quantize_ptq_int8(tiny_bert_classifier(len(tokenizer)))
    return save_artifact(
        model, tokenizer, tmp_path / "a", task="sequence-classification", quantization="ptq-int8", metrics={}
    )


def test_tampered_weights_are_refused(saved: Path) -> None:
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for model\.safetensors"):
        load_artifact(saved)


def test_tampered_checksum_is_refused(saved: Path) -> None:
    meta = json.loads((saved / "kdistill.json").read_text())
    meta["files"]["config.json"] = "0" * 64
    (saved / "kdistill.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for config\.json"):
        load_artifact(saved)


def test_artifact_metadata_is_checked(saved: Path) -> None:
    meta_path = saved / "kdistill.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "files": {**meta["files"], "../outside": "0" * 64}}))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_artifact(saved)
    meta_path.write_text(json.dumps({**meta, "task": "translation"}))
    with pytest.raises(ArtifactError, match="task must be one of"):
        load_artifact(saved)
    meta_path.unlink()
    with pytest.raises(ArtifactError, match=r"no kdistill\.json"):
        load_artifact(saved)


def test_save_refuses_mismatched_quantization(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(ArtifactError, match="INT8 layers"):
        save_artifact(
            tiny_gpt2(len(tokenizer)), tokenizer, tmp_path / "x", task="causal-lm", quantization="qat-int8", metrics={}
        )
