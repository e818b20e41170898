"""The served INT8 model under each kernel: the same artifact loaded with the oneDNN-packed kernel
gives the fbgemm kernel's numbers (same activation quantization), every kernel stays within INT8
tolerance of the float model and of the others, and the server measures which one is fastest when
it loads the model, caches the choice, and reports it in ``/metrics`` and its model info."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch
from torch import nn

from kdistill.serving import kernel_choice
from kdistill.trainer import quantization as q
from kdistill.trainer.artifact import load_artifact, save_artifact
from tests.serving.helpers import (
    ServerProcess,
    build_tiny_tokenizer,
    served_kernel,
    served_kernels,
    tiny_bert_classifier,
    tiny_gpt2,
)


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


# ---- the kernel the server picks ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_kernel_answers_like_the_others_within_int8_tolerance(tmp_path: Path, family: str) -> None:
    """The choice changes speed, not answers: each kernel the server may pick gives the float
    model's logits within INT8 tolerance, and the kernels agree with each other as closely."""
    tok = build_tiny_tokenizer(tmp_path / "tok")
    build = tiny_bert_classifier if family == "bert" else tiny_gpt2
    task = "sequence-classification" if family == "bert" else "causal-lm"
    fp32 = build(len(tok), seed=11)
    int8 = q.quantize_ptq_int8(build(len(tok), seed=11), "fbgemm-dynamic")
    out = save_artifact(int8, tok, tmp_path / "a" / "student-int8", task=task, quantization="ptq-int8", metrics={})
    ids = torch.randint(5, len(tok), (3, 24), generator=torch.Generator().manual_seed(5))
    kernels = kernel_choice.candidates()
    assert {"torchao-dynamic", "weight-only"} <= set(kernels) and len(kernels) >= 3
    with torch.inference_mode():
        ref = fp32(input_ids=ids).logits
        by_kernel = {k: load_artifact(out, kernel=k).model(input_ids=ids).logits for k in kernels}
    for k, logits in by_kernel.items():
        err = float((logits - ref).norm() / ref.norm())
        assert 0 < err < 0.05, (k, err)
    for a in kernels:
        for b in kernels:
            apart = float((by_kernel[a] - by_kernel[b]).norm() / ref.norm())
            assert apart < 0.05, (a, b, apart)


def test_plan_runs_each_row_count_on_the_kernel_fastest_there() -> None:
    ms = {
        "fbgemm-dynamic": {"16": 1.0, "128": 6.0, "2048": 100.0},
        "onednn-dynamic": {"16": 2.0, "128": 6.2, "2048": 80.0},
        "torchao-dynamic": {"16": 0.5},  # fastest at 16 rows, pruned at 128 and 2048
    }
    # torchao for small inputs; at 128 rows fbgemm is more than 5% faster than torchao (pruned:
    # lost by at least PRUNE_FACTOR) from sqrt(16 * 128) = 45 rows; oneDNN from sqrt(128 * 2048) = 512.
    assert kernel_choice.plan(ms) == ("torchao-dynamic", [[45, "fbgemm-dynamic"], [512, "onednn-dynamic"]])
    del ms["torchao-dynamic"]
    assert kernel_choice.plan(ms) == ("fbgemm-dynamic", [[512, "onednn-dynamic"]])
    # Within SWITCH_MARGIN of the current kernel: no switch (run-to-run noise keeps one band).
    ms["onednn-dynamic"]["2048"] = 96.0
    assert kernel_choice.plan(ms) == ("fbgemm-dynamic", [])
    with pytest.raises(ValueError, match="no kernel was timed"):
        kernel_choice.plan({"fbgemm-dynamic": {}})


def test_an_int8_layer_runs_the_kernel_of_its_input_rows() -> None:
    torch.manual_seed(0)
    layer = q.Int8Linear.from_int8(
        torch.randint(-127, 128, (8, 16), dtype=torch.int8), torch.rand(8) / 100, torch.randn(8), "fbgemm-dynamic"
    )
    bands = ((4, cast(q.Int8Kernel, "weight-only")), (32, cast(q.Int8Kernel, "onednn-dynamic")))
    q.set_int8_kernel(layer, "fbgemm-dynamic", bands)
    assert [layer.kernel_for(n) for n in (1, 3, 4, 31, 32, 4096)] == [
        "fbgemm-dynamic",
        "fbgemm-dynamic",
        "weight-only",
        "weight-only",
        "onednn-dynamic",
        "onednn-dynamic",
    ]
    reference = q.Int8Linear.from_int8(layer.weight_int8, layer.weight_scale, layer.bias, "weight-only")
    for rows in (2, 8, 64):  # [batch, seq, in]: rows are batch x seq
        x = torch.randn(2, rows // 2, 16)
        torch.testing.assert_close(layer(x), reference(x), rtol=0.05, atol=0.05)
    assert set(layer._impls) == {"fbgemm-dynamic", "weight-only", "onednn-dynamic"}


def quantized_bert(seed: int = 0) -> nn.Module:
    return q.quantize_ptq_int8(tiny_bert_classifier(300, width=128, seed=seed), "fbgemm-dynamic")


def test_the_kernel_is_measured_at_load_then_taken_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(q.KERNEL_ENV, raising=False)
    monkeypatch.delenv(kernel_choice.PROBE_ENV, raising=False)
    monkeypatch.setenv(kernel_choice.CACHE_DIR_ENV, str(tmp_path / "cache"))
    model = quantized_bert()
    first = kernel_choice.apply(model)
    assert first.source == "measured"
    assert (first.kernel, first.bands) == kernel_choice.plan(first.ms)
    for kernel in kernel_choice.candidates():  # every kernel was timed (pruned ones at fewer rows)
        assert kernel in first.ms
    # Every INT8 layer now runs the chosen kernel, and each band's kernel from its row count on.
    layers = [m for m in model.modules() if isinstance(m, q.Int8Linear)]
    assert {(m.kernel, m.bands) for m in layers} == {(first.kernel, tuple((r, k) for r, k in first.bands))}
    cached = json.loads((tmp_path / "cache" / kernel_choice.CACHE_FILE).read_text())
    assert (cached[first.key]["kernel"], cached[first.key]["bands"]) == (first.kernel, first.bands)
    again = kernel_choice.choose(quantized_bert(seed=1))  # same shapes, same CPU: no measurement
    assert (again.source, again.kernel, again.bands, again.key) == ("cache", first.kernel, first.bands, first.key)
    # Other shapes are another entry.
    wider = q.quantize_ptq_int8(tiny_bert_classifier(300, width=192), "fbgemm-dynamic")
    assert kernel_choice.cache_key(wider) != first.key


def test_forced_table_and_float_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernel_choice.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(q.KERNEL_ENV, "weight-only")
    assert (kernel_choice.choose(quantized_bert()).kernel, kernel_choice.choose(quantized_bert()).source) == (
        "weight-only",
        "forced",
    )
    monkeypatch.delenv(q.KERNEL_ENV)
    monkeypatch.setenv(kernel_choice.PROBE_ENV, "0")
    table = kernel_choice.choose(quantized_bert())
    assert (table.kernel, table.source) == (q.select_int8_kernel(), "table")
    assert not (tmp_path / "cache").exists()  # neither measured nor cached
    monkeypatch.setenv(kernel_choice.PROBE_ENV, "yes")
    with pytest.raises(ValueError, match=kernel_choice.PROBE_ENV):
        kernel_choice.choose(quantized_bert())
    float_model = tiny_bert_classifier(300)
    assert kernel_choice.apply(float_model).as_dict()["kernel"] == "none"


def test_an_unwritable_cache_still_measures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(q.KERNEL_ENV, raising=False)
    monkeypatch.delenv(kernel_choice.PROBE_ENV, raising=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(kernel_choice.CACHE_DIR_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="kdistill.serving"):
        choice = kernel_choice.choose(quantized_bert())
    assert choice.source == "measured" and choice.kernel in kernel_choice.candidates()
    assert "not cached" in caplog.text


def test_the_server_reports_its_kernel_in_metrics_and_model_info(cls_artifact: Path, tmp_path: Path) -> None:
    env = {kernel_choice.CACHE_DIR_ENV: str(tmp_path / "cache")}
    seen = []
    for _ in range(2):  # the second start finds the first one's measurement
        server = ServerProcess(cls_artifact, env=env)
        try:
            server.wait_ready()
            kernel, source = served_kernel(server)
            _, bands = served_kernels(server)
            card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["kdistill"]
            meta = httpx.get(f"{server.url}/v2/models/{card_name(cls_artifact)}", timeout=10).json()
        finally:
            server.terminate()
        assert kernel in kernel_choice.candidates()
        assert card == {
            "task": "sequence-classification",
            "quantization": "ptq-int8",
            "int8_kernel": kernel,
            "int8_kernel_source": source,
            "int8_kernel_bands": [[rows, band] for rows, band in bands],
        }
        assert meta["parameters"] == card
        seen.append((kernel, source))
    assert [s for _, s in seen] == ["measured", "cache"]
    assert seen[0][0] == seen[1][0]


def card_name(artifact: Path) -> str:
    return artifact.parent.name  # <job>/student-int8 is served as <job>
