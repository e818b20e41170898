"""One student step over real gloo processes, for each mesh dimension alone and mixed 2x2,
equals a single-process step on the whole batch: the same loss and the same gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .harness import run_ranks
from .models import tiny_model
from .workers import sample_weights, student_batch, token_loss

ROWS, LENGTH = 4, 12


def reference(family: str, qat: bool = False, accum: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    """The single-process step; with ``accum`` > 1 over the rows in that many micro-batches, each
    loss divided by ``accum`` (gradient accumulation)."""
    model = tiny_model(family, layers=4)
    if qat:
        from kdistill.trainer.quantization import prepare_qat

        prepare_qat(model)
    ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
    size, total = ROWS // accum, 0.0
    for i in range(accum):
        part = slice(i * size, (i + 1) * size)
        logits = model(input_ids=ids[part], attention_mask=mask[part]).logits
        per_token = token_loss(logits, teacher[part], labels[part]).masked_fill(labels[part] == -100, 0.0)
        loss = per_token.sum() / (labels[part] != -100).sum() / accum
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters()}


def _assert_ranks_match(tmp_path: Path, world: int, ref_loss: float, ref_grads: dict[str, torch.Tensor]) -> set[str]:
    """Every rank's loss and gradients against the reference; the names of the gradients seen."""
    seen: set[str] = set()
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert float(got.pop("__loss__")) == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in got.items():
            if name == "lm_head.weight" and name not in ref_grads:
                name = "transformer.wte.weight"  # GPT2's head is tied to the input embedding
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
            seen.add(name)
    return seen


def test_accumulated_pipeline_steps_add_the_tied_gradient_once(tmp_path: Path) -> None:
    """GPT2's embedding and head are one tied weight with a copy on the first and the last stage:
    over two accumulated micro-batches the stages add only what each micro-batch contributes, so
    the tied gradient equals the single-process one (summing the accumulated gradient again after
    the second micro-batch would count the first one twice)."""
    args = {"family": "gpt2", "pipeline": 2, "data": 1, "tensor": 1, "rows": ROWS, "length": LENGTH}
    run_ranks(2, "tests.parallel.workers:student_step", tmp_path, {**args, "accum": 2})
    ref_loss, ref_grads = reference("gpt2", accum=2)
    assert _assert_ranks_match(tmp_path, 2, ref_loss, ref_grads) == set(ref_grads)


@pytest.mark.parametrize(
    ("family", "pipeline", "data", "tensor"),
    [
        ("llama", 1, 2, 1),
        ("llama", 1, 1, 2),
        ("gpt2", 2, 1, 1),
        ("llama", 1, 2, 2),
        ("llama", 2, 2, 1),
        ("gpt2", 1, 1, 2),
        ("gpt2", 2, 1, 2),
        ("gpt2", 1, 2, 2),
    ],
    ids=[
        "data2",
        "tensor2",
        "pipeline2-gpt2",
        "data2xtensor2",
        "pipeline2xdata2",
        "tensor2-gpt2",
        "pipeline2xtensor2-gpt2",
        "data2xtensor2-gpt2",
    ],
)
def test_parallel_step_equals_single_process(
    tmp_path: Path, family: str, pipeline: int, data: int, tensor: int
) -> None:
    world = pipeline * data * tensor
    run_ranks(
        world,
        "tests.parallel.workers:student_step",
        tmp_path,
        {"family": family, "pipeline": pipeline, "data": data, "tensor": tensor, "rows": ROWS, "length": LENGTH},
    )
    ref_loss, ref_grads = reference(family)
    # Together the ranks hold a gradient for every parameter (tied weights appear once by name).
    assert _assert_ranks_match(tmp_path, world, ref_loss, ref_grads) == set(ref_grads)


@pytest.mark.parametrize(
    ("family", "pipeline", "data", "tensor"),
    [
        ("llama", 1, 1, 2),
        ("gpt2", 2, 1, 1),
        ("llama", 1, 2, 2),
        ("llama", 2, 1, 2),
        ("gpt2", 1, 1, 2),
        ("gpt2", 2, 1, 2),
    ],
    ids=["tensor2", "pipeline2-gpt2", "data2xtensor2", "pipeline2xtensor2", "tensor2-gpt2", "pipeline2xtensor2-gpt2"],
)
def test_fake_quant_step_equals_single_process_qat(
    tmp_path: Path, family: str, pipeline: int, data: int, tensor: int
) -> None:
    """INT8 fake quantization of the split student (row-parallel shards with the whole layer's
    scales; GPT2's Conv1D layers whole in pipeline stages and sharded by tensor) gives torchao's
    unsplit QAT step: the same loss and gradients."""
    world = pipeline * data * tensor
    args = {"family": family, "pipeline": pipeline, "data": data, "tensor": tensor, "rows": ROWS, "length": LENGTH}
    run_ranks(world, "tests.parallel.workers:student_step", tmp_path, {**args, "qat": True})
    ref_loss, ref_grads = reference(family, qat=True)
    plain_loss, _ = reference(family)
    assert abs(ref_loss - plain_loss) > 1e-6  # fake quantization changes the numbers
    assert _assert_ranks_match(tmp_path, world, ref_loss, ref_grads) == set(ref_grads)


@pytest.mark.parametrize(
    ("pipeline", "data", "tensor"),
    [(1, 1, 2), (2, 1, 1), (2, 2, 1)],
    ids=["tensor2", "pipeline2", "pipeline2xdata2"],
)
def test_weighted_step_equals_single_process_weighted_mean(
    tmp_path: Path, pipeline: int, data: int, tensor: int
) -> None:
    """Per-token weights carried with the teacher's side of each token (as entropy weighting
    carries them) and the global sum of the weights as the normaliser: the single-process
    weighted token mean, its loss and gradients."""
    world = pipeline * data * tensor
    args = {"family": "llama", "pipeline": pipeline, "data": data, "tensor": tensor, "rows": ROWS, "length": LENGTH}
    run_ranks(world, "tests.parallel.workers:student_step", tmp_path, {**args, "weighted": True})
    model = tiny_model("llama", layers=4)
    ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
    weights = sample_weights(ROWS, LENGTH)
    logits = model(input_ids=ids, attention_mask=mask).logits
    per_token = (token_loss(logits, teacher, labels) * weights).masked_fill(labels == -100, 0.0)
    loss = per_token.sum() / (weights * (labels != -100)).sum()
    loss.backward()
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert float(got.pop("__loss__")) == pytest.approx(float(loss.detach()), rel=1e-5)
        for name, grad in got.items():
            ref = dict(model.named_parameters())[name].grad
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
