"""A student with its own tokenizer distils from a teacher through logits with crossTokenizer
(uld, byte-span) and beats the same student trained without the teacher, in bits per byte on
held-out text; the checks at start that refuse what cannot run across tokenizers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill.api import DistillationJob
from kdistill.api.failures import ExitCode
from kdistill.trainer.batching import collate
from kdistill.trainer.data import Example, tokenize_examples
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.evaluate import evaluate
from kdistill.trainer.models import load_models
from kdistill.trainer.runner import main_entry
from kdistill.trainer.sampling import BatchSampler
from kdistill.trainer.tokenizer_build import build_tokenizer

from . import helpers

# Little data for the student (32 texts, 200 steps of 8): where a teacher that read far more
# text helps. Measured here (seed 0): plain CE 3.88 bits per byte, uld 3.66, byte-span 3.33,
# teacher 2.64; the margins asserted are a quarter of the smaller gap.
STUDENT_TEXTS = 32
STUDENT_STEPS = 200
TEACHER_STEPS = 400


def _pretrain_teacher(out: Path, texts: list[str]) -> Path:
    """A GPT2 teacher learned by CE on ``texts`` with its own 600-token BPE."""
    tok = build_tokenizer(texts, 600, out)
    examples = tokenize_examples([Example(i, t, None) for i, t in enumerate(texts)], tok, 64)
    torch.manual_seed(0)
    model = helpers.gpt2(len(tok), layers=2, width=64, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = iter(BatchSampler(examples, 16, strategy="uniform", tiers=None, shares=(1.0, 0.0, 0.0), seed=0))
    for _ in range(TEACHER_STEPS):
        b = collate([examples[i] for i in next(batches)], int(tok.pad_token_id), "causal-lm")
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return helpers.save_model(model, tok, out)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross-tokenizer")
    paras = [p for _, p in helpers.pydoc_paragraphs(3000)]
    held_out, teacher_texts = paras[:120], paras[120:]
    teacher = _pretrain_teacher(root / "teacher", teacher_texts)
    # The student: another architecture with a smaller BPE learned from other texts.
    s_tok = build_tokenizer(paras[::3], 400, root / "student")
    student = helpers.save_model(helpers.llama(len(s_tok), layers=2, width=32, seed=1), s_tok, root / "student")
    return {
        "root": root,
        "teacher": teacher,
        "student": student,
        "train": helpers.write_jsonl(root / "train.jsonl", [{"text": t} for t in teacher_texts[:STUDENT_TEXTS]]),
        "eval": helpers.write_jsonl(root / "eval.jsonl", [{"text": t} for t in held_out]),
    }


def _job(setting: dict[str, Path], name: str, method: str, alpha: float, **extra: Any) -> dict[str, Any]:
    job = helpers.job_dict(
        name,
        "causal-lm",
        str(setting["teacher"]),
        str(setting["train"]),
        str(setting["eval"]),
        student={"model": str(setting["student"])},
        stages=[{"name": "output", "steps": STUDENT_STEPS, "objectives": ["logits"]}],
        batch_size=8,
        every_steps=1000,
        extra_distillation={
            "alpha": alpha,
            "crossTokenizer": {"method": method},
            "learningRate": 3e-3,
            "warmupSteps": 5,
            "temperature": {"schedule": "constant", "start": 1.0, "end": 1.0},
            **extra,
        },
    )
    job["spec"]["data"]["maxSeqLength"] = 64
    job["spec"]["serving"] = {"enabled": False}
    return job


def _run(setting: dict[str, Path], job: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    name = job["metadata"]["name"]
    out = setting["root"] / f"out-{name}"
    steps: list[Any] = []
    code = main_entry(helpers.write_job(setting["root"] / f"{name}.yaml", job), out, on_step=steps.append)
    assert code == 0
    return json.loads((out / "result.json").read_text()), steps


def test_each_method_beats_the_student_without_teacher(setting: dict[str, Path]) -> None:
    # alpha 0: the KD term has no weight, so this is plain CE on the student's own tokens.
    plain, plain_steps = _run(setting, _job(setting, "plain", "uld", 0.0))
    uld, uld_steps = _run(setting, _job(setting, "uld", "uld", 0.5))
    span, span_steps = _run(setting, _job(setting, "span", "byte-span", 0.5))
    for result in (plain, uld, span):
        m = result["metrics"]
        assert m["metric"] == "bits-per-byte" and m["student"] == m["studentBitsPerByte"]
        assert m["retention"] == pytest.approx(m["teacher"] / m["student"])
    assert plain["metrics"]["teacher"] == uld["metrics"]["teacher"] == span["metrics"]["teacher"]
    assert {"kd", "ce", "logits"} <= set(uld_steps[-1].parts) and uld_steps[-1].parts["kd"] > 0
    assert span_steps[-1].parts["kd"] > 0 and plain_steps[-1].parts["kd"] > 0  # measured, weighted 0
    bpb = {n: r["metrics"]["student"] for n, r in (("plain", plain), ("uld", uld), ("byte-span", span))}
    print(f"bits per byte on held-out text: {bpb}, teacher {plain['metrics']['teacher']:.3f}")
    assert bpb["uld"] < bpb["plain"] - 0.05, bpb
    assert bpb["byte-span"] < bpb["plain"] - 0.05, bpb
    # The saved student carries its own tokenizer, not the teacher's.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(span["student"])
    own = AutoTokenizer.from_pretrained(str(setting["student"]))
    assert saved.get_vocab() == own.get_vocab()


def test_eval_reports_bits_per_byte_from_scored_bytes(setting: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setting["teacher"]))
    model = AutoModelForCausalLM.from_pretrained(str(setting["teacher"]))
    texts = ["The for statement is used to iterate.", "naïve café — x ** 2"]
    ids = [tok(t)["input_ids"] for t in texts]
    batch = collate([tokenize_examples([Example(i, t, None)], tok, 64)[0] for i, t in enumerate(texts)], 0, "causal-lm")
    # Bytes scored: every token's bytes but the first token's.
    scored = [len(t.encode()) - len(tok.decode(i[:1]).encode()) for t, i in zip(texts, ids, strict=True)]
    batch["scored_bytes"] = torch.tensor(scored)
    result = evaluate(model, [batch], "causal-lm", torch.device("cpu"))
    with torch.no_grad():
        nll = sum(float(model(input_ids=torch.tensor([i]), labels=torch.tensor([i])).loss) * (len(i) - 1) for i in ids)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / sum(scored), rel=1e-5)
    assert result.by_bits_per_byte().metric == "bits-per-byte"


def _spec(setting: dict[str, Path], **changes: Any) -> Any:
    job = _job(setting, "check", "uld", 0.5)
    distillation = job["spec"]["distillation"]
    for key, value in changes.items():
        if value is None:
            distillation.pop(key, None)
        else:
            distillation[key] = value
    return DistillationJob.model_validate(job).spec


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"crossTokenizer": None}, "distillation.crossTokenizer.method (uld or byte-span)"),
        (
            {"stages": [{"name": "f", "steps": 2, "objectives": ["hidden", "logits"]}]},
            "distillation.stages[0] (f) uses hidden",
        ),
        ({"teacherCache": {"enabled": True}}, "distillation.teacherCache.enabled false"),
    ],
)
def test_a_student_with_its_own_tokenizer_is_refused_with_the_field_to_change(
    setting: dict[str, Path], changes: dict[str, Any], expected: str
) -> None:
    with pytest.raises(TrainerError) as err:
        load_models(_spec(setting, **changes), setting["root"])
    assert err.value.code == ExitCode.BAD_SPEC
    assert "maps text to ids differently" in err.value.message and expected in err.value.message


def test_a_student_with_its_own_tokenizer_is_accepted_with_cross_tokenizer_or_text_objectives(
    setting: dict[str, Path],
) -> None:
    models = load_models(_spec(setting), setting["root"])
    assert models.cross_tokenizer and len(models.student_tokenizer) != len(models.tokenizer)
    # sequence passes text between the models: no crossTokenizer needed.
    text_only = load_models(
        _spec(setting, crossTokenizer=None, stages=[{"name": "g", "steps": 2, "objectives": ["sequence"]}]),
        setting["root"],
    )
    assert text_only.cross_tokenizer


def test_a_student_with_the_teachers_tokenizer_takes_the_ordinary_path(setting: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setting["teacher"]))
    same = helpers.save_model(helpers.gpt2(len(tok), layers=1), tok, setting["root"] / "same-tokenizer")
    job = _job(setting, "same", "uld", 0.5)
    job["spec"]["student"] = {"model": str(same)}
    models = load_models(DistillationJob.model_validate(job).spec, setting["root"])
    assert not models.cross_tokenizer and models.student_tokenizer is None


def test_the_example_runs_on_tiny_models(setting: dict[str, Path]) -> None:
    """examples/cross-tokenizer.yaml as it is, on this module's models and data, a few steps."""
    import yaml

    job = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "cross-tokenizer.yaml").read_text())
    spec = job["spec"]
    spec["teacher"]["model"] = str(setting["teacher"])
    spec["student"]["model"] = str(setting["student"])
    spec["data"].update(train=str(setting["train"]), eval=str(setting["eval"]), maxSeqLength=64)
    spec["distillation"]["stages"][0]["steps"] = 4
    spec["distillation"]["batchSize"] = 4
    result, steps = _run(setting, job)
    assert len(steps) == 4 and steps[-1].parts["kd"] > 0
    assert result["metrics"]["metric"] == "bits-per-byte" and result["int8"] == result["metrics"]
    assert result["fullPrecision"]["metric"] == "bits-per-byte"
