"""Decoder sequence classifiers split over real gloo processes: a teacher cut into pipeline
stages gives the unsplit model's class logits (pooled at Hugging Face's last non-pad token, with
right or left padding), and one step of a student classifier split by pipeline, tensor, data and
their mixes gives the single-process loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.trainer.parallel.stages import hollow_to_stage, pool_positions, stage_forward

from .classify_workers import LABELS, classifier_batch, padded_batch
from .harness import run_ranks
from .models import tiny_model
from .workers import token_loss

ROWS, LENGTH = 4, 12


@pytest.mark.parametrize(
    ("family", "world", "stages", "side"),
    [("gpt2", 2, 2, "right"), ("llama", 2, 2, "left"), ("llama", 4, 2, "right"), ("gpt2", 3, 3, "left")],
    ids=["gpt2-stages2-right", "llama-stages2-left", "llama-world4-stages2-right", "gpt2-stages3-left"],
)
def test_split_classifier_teacher_matches_unsplit(
    tmp_path: Path, family: str, world: int, stages: int, side: str
) -> None:
    run_ranks(
        world,
        "tests.parallel.classify_workers:classifier_teacher_split",
        tmp_path,
        {"family": family, "layers": 6, "stages": stages, "side": side, "micro": 2},
    )
    full = tiny_model(family, layers=6, num_labels=LABELS).eval()
    for rank in range(world):
        out = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        with torch.no_grad():
            ref = full(input_ids=out["ids"], attention_mask=out["mask"]).logits
        assert out["logits"].shape == ref.shape == (out["ids"].shape[0], LABELS)
        torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-5)


def test_pool_positions_follow_hugging_face() -> None:
    ids, _ = padded_batch(0, rows=5, length=7, side="right")
    ids[1, 2] = 0  # a pad id inside the text does not move the pooled position
    assert pool_positions(ids, 0).tolist() == [6, 4, 2, 6, 4]
    left, _ = padded_batch(0, rows=5, length=7, side="left")
    assert pool_positions(left, 0).tolist() == [6] * 5
    assert pool_positions(ids[:1], None).tolist() == [6]
    with pytest.raises(ValueError, match="pad_token_id"):
        pool_positions(ids, None)


def test_hollowed_classifier_needs_the_pooled_positions_on_a_later_last_stage() -> None:
    model = hollow_to_stage(tiny_model("llama", layers=2, num_labels=LABELS), range(1, 2), first=False, last=True)
    with pytest.raises(ValueError, match="pooled positions"):
        stage_forward(model, torch.zeros(1, 4, 32))


def test_encoder_classifiers_are_refused_with_the_supported_families() -> None:
    """A BERT classifier has no decoder stages to cut: the split teacher and the pipeline-split
    student refuse it by name (the runtime turns this into BAD_SPEC at start)."""
    from kdistill.trainer.parallel.teacher_pipeline import plan_split
    from tests.trainer.helpers import bert

    with pytest.raises(ValueError, match="BertForSequenceClassification: only GPT2 and Llama-family decoders"):
        plan_split(bert(64, layers=2), [0, 1], 0)


def reference(family: str, qat: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model(family, layers=4, num_labels=LABELS)
    if qat:
        from kdistill.trainer.quantization import prepare_qat

        prepare_qat(model)
    ids, mask, labels, teacher = classifier_batch(ROWS, LENGTH)
    logits = model(input_ids=ids, attention_mask=mask).logits.unsqueeze(1)
    loss = token_loss(logits, teacher, labels).sum() / ROWS
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


LAYOUTS = [
    ("gpt2", 2, 1, 1),
    ("llama", 2, 1, 1),
    ("llama", 1, 1, 2),
    ("llama", 2, 1, 2),
    ("gpt2", 2, 1, 2),
    ("llama", 2, 2, 1),
]
LAYOUT_IDS = [
    "pipeline2-gpt2",
    "pipeline2-llama",
    "tensor2-llama",
    "pipeline2xtensor2-llama",
    "pipeline2xtensor2-gpt2",
    "pipeline2xdata2-llama",
]


def _check_step(tmp_path: Path, world: int, ref_loss: float, ref_grads: dict[str, torch.Tensor]) -> None:
    seen: set[str] = set()
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert float(got.pop("__loss__")) == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in got.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
            seen.add(name)
    # Together the ranks hold a gradient for every parameter, the classifier head included.
    assert seen == set(ref_grads) and "score.weight" in seen


@pytest.mark.parametrize(("family", "pipeline", "data", "tensor"), LAYOUTS, ids=LAYOUT_IDS)
def test_split_classifier_step_equals_single_process(
    tmp_path: Path, family: str, pipeline: int, data: int, tensor: int
) -> None:
    world = pipeline * data * tensor
    args = {"family": family, "pipeline": pipeline, "data": data, "tensor": tensor, "rows": ROWS, "length": LENGTH}
    run_ranks(world, "tests.parallel.classify_workers:classifier_student_step", tmp_path, args)
    _check_step(tmp_path, world, *reference(family))


@pytest.mark.parametrize(
    ("family", "pipeline", "data", "tensor"),
    [("gpt2", 2, 1, 1), ("llama", 2, 1, 2)],
    ids=["pipeline2-gpt2", "pipeline2xtensor2-llama"],
)
def test_split_classifier_fake_quant_step_equals_single_process_qat(
    tmp_path: Path, family: str, pipeline: int, data: int, tensor: int
) -> None:
    """INT8 fake quantization of the split classifier's shards (the score head stays in full
    precision, as in one process) gives torchao's unsplit QAT step."""
    world = pipeline * data * tensor
    args = {"family": family, "pipeline": pipeline, "data": data, "tensor": tensor, "rows": ROWS, "length": LENGTH}
    run_ranks(world, "tests.parallel.classify_workers:classifier_student_step", tmp_path, {**args, "qat": True})
    ref_loss, ref_grads = reference(family, qat=True)
    assert abs(ref_loss - reference(family)[0]) > 1e-6  # fake quantization changes the numbers
    _check_step(tmp_path, world, ref_loss, ref_grads)
