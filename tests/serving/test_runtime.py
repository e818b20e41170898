"""The inference runtime's settings (serving/runtime.py, serving/engine.py): the served model runs
fused activations with the same outputs, the tuned allocator keeps freed activations for the next
forward, and big classification passes may run on more intra-op threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from kdistill.serving.engine import BATCH_THREADS_ENV, BIG_PASS_TOKENS, Engine, batch_threads_from_env
from kdistill.serving.metrics import ServerMetrics
from kdistill.serving.runtime import (
    TUNE_ALLOCATOR_DEFAULT,
    TUNE_ALLOCATOR_ENV,
    InferenceTanhGELU,
    allocator_tuning_wanted,
    prepare_for_inference,
)
from kdistill.trainer.artifact import load_artifact
from kdistill.trainer.quantization import Int8Linear, set_int8_kernel
from tests.serving.helpers import pydoc_texts

REPO = Path(__file__).resolve().parents[2]


def test_engine_serves_the_int8_gpt2_with_fused_gelu_and_the_same_logits(lm_artifact: Path) -> None:
    plain = load_artifact(lm_artifact).model
    assert sum(isinstance(m, NewGELUActivation) for m in plain.modules()) == 2  # gelu_new as saved
    engine = Engine(load_artifact(lm_artifact), ServerMetrics())
    assert engine.runtime == {"tanh_gelu": 2}
    assert not any(isinstance(m, NewGELUActivation) for m in engine.model.modules())
    assert sum(isinstance(m, InferenceTanhGELU) for m in engine.model.modules()) == 2
    assert any(isinstance(m, Int8Linear) for m in engine.model.modules())  # still the INT8 student
    # The same INT8 kernel on both sides (the engine takes the fastest on this machine, and kernels
    # quantize activations with their own rounding): what differs is the GELU alone.
    set_int8_kernel(plain, engine.int8_kernel.kernel, tuple((r, k) for r, k in engine.int8_kernel.bands))
    ids = engine.tokenizer("The for statement is used to iterate", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref, out = plain(input_ids=ids).logits, engine.model(input_ids=ids).logits
    # Float rounding of the GELU only (it can move one activation across an int8 rounding step,
    # hence a tolerance of a quantization step, not of float eps).
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)
    assert out[0, -1].argmax() == ref[0, -1].argmax()


def test_inference_tanh_gelu_is_the_tanh_gelu_with_and_without_grad() -> None:
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    ref = F.gelu(x, approximate="tanh")  # float64: the function itself
    xf = x.float()
    with torch.inference_mode():
        out = InferenceTanhGELU()(xf)
    assert (out.double() - ref).abs().max() < 1e-6
    assert torch.equal(xf, x.float())  # the input is not modified in place
    small = xf[::1000]  # under SMALL_ACTIVATION: torch's kernel
    torch.testing.assert_close(InferenceTanhGELU()(small), F.gelu(small, approximate="tanh"), rtol=0, atol=0)
    xg = xf[::1000].clone().requires_grad_(True)
    y = InferenceTanhGELU()(xg)
    (g,) = torch.autograd.grad(y.sum(), xg)  # with grad on: torch's kernel, differentiable
    torch.testing.assert_close(y, F.gelu(xg, approximate="tanh"))
    assert g.shape == xg.shape


def test_prepare_for_inference_swaps_torch_tanh_gelu_too() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_pytorch_tanh"
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(97, (2, 9))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        assert prepare_for_inference(model) == {"tanh_gelu": 2}
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert prepare_for_inference(model) == {"tanh_gelu": 0}  # idempotent


def test_prepare_for_inference_leaves_bert_and_its_weights_alone(cls_artifact: Path) -> None:
    model = load_artifact(cls_artifact).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_for_inference(model) == {"tanh_gelu": 0}  # BERT's erf GELU is one kernel already
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


ALLOCATING_LOOP = textwrap.dedent("""
    import ctypes
    import torch
    from kdistill.serving.runtime import tune_allocator

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2

    def kept_after_a_forward() -> int:
        # Free bytes malloc keeps for reuse after a forward-like pattern: six live 16 MiB
        # activations, then all of them freed.
        for _ in range(3):
            live = [torch.empty(1 << 22).fill_(1.0)]
            for _ in range(5):
                live.append(live[-1] + 1)
            del live
        return int(mallinfo2().fordblks)

    default = kept_after_a_forward()
    tuned_ok = tune_allocator()
    print(default, kept_after_a_forward(), tuned_ok, tune_allocator())
""")


def test_tuned_allocator_keeps_freed_activations_for_reuse() -> None:
    # glibc's initial thresholds, pinned: left dynamic, they move with what the process allocated
    # before (torch's import), and so does the "default" baseline.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-P", "-c", ALLOCATING_LOOP],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    ).stdout.split()
    default, tuned, ok, again = int(out[0]), int(out[1]), out[2], out[3]
    assert ok == "True" and again == "True"  # glibc (Linux): both settings accepted, idempotent
    # glibc's defaults give the freed 96 MiB back to the kernel (munmap, or a heap trim), so the next
    # forward faults them in again page by page; tuned, it keeps them.
    assert default < 64 << 20
    assert tuned >= 96 << 20


def test_big_classification_passes_run_on_batch_threads_and_small_ones_do_not(
    cls_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Engine(load_artifact(cls_artifact), ServerMetrics())
    monkeypatch.setenv(BATCH_THREADS_ENV, "2")
    engine = Engine(load_artifact(cls_artifact), ServerMetrics())
    assert (base.batch_threads, engine.batch_threads) == (0, 2)
    texts = pydoc_texts(80)
    long_batch = [engine.encode(" ".join(texts[i : i + 4]))[:100] for i in range(16)]  # >= BIG_PASS_TOKENS
    assert sum(len(r) for r in long_batch) >= BIG_PASS_TOKENS
    threads = torch.get_num_threads()
    got, ref = engine.run_classification(long_batch), base.run_classification(long_batch)
    assert engine.big_passes >= 1 and base.big_passes == 0
    assert torch.get_num_threads() == threads  # restored after the pass
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    before = engine.big_passes
    engine.run_classification([engine.encode("x = 1")])  # batch of one: the server's own threads
    engine.run_classification([engine.encode("x = 1"), engine.encode("y = 2")])  # small pass
    assert engine.big_passes == before


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_bad_batch_threads_setting_is_refused_by_name(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BATCH_THREADS_ENV, raw)
    with pytest.raises(ValueError, match=BATCH_THREADS_ENV):
        batch_threads_from_env()


def test_engine_encodes_like_the_tokenizer(cls_artifact: Path, lm_artifact: Path) -> None:
    for artifact in (cls_artifact, lm_artifact):
        engine = Engine(load_artifact(artifact), ServerMetrics())
        assert engine._backend is not None  # the fast path is the one under test
        for text in [*pydoc_texts(30), "x", "  leading and trailing  ", "naïve café ünïcode ✓"]:
            assert engine.encode(text) == list(engine.tokenizer(text, add_special_tokens=True)["input_ids"])
    truncating = load_artifact(cls_artifact)
    truncating.tokenizer.backend_tokenizer.enable_truncation(4)
    engine = Engine(truncating, ServerMetrics())
    assert engine._backend is None  # the backend's own settings would change the ids: the wrapper decides
    text = pydoc_texts(1)[0]
    assert engine.encode(text) == list(truncating.tokenizer(text, add_special_tokens=True)["input_ids"])


def test_allocator_tuning_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TUNE_ALLOCATOR_ENV, raising=False)
    assert allocator_tuning_wanted() is TUNE_ALLOCATOR_DEFAULT
    for raw, wanted in (("1", True), ("0", False)):
        monkeypatch.setenv(TUNE_ALLOCATOR_ENV, raw)
        assert allocator_tuning_wanted() is wanted
    monkeypatch.setenv(TUNE_ALLOCATOR_ENV, "yes")
    with pytest.raises(ValueError, match=TUNE_ALLOCATOR_ENV):
        allocator_tuning_wanted()
