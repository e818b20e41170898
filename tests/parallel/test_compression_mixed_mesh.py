"""Top-k compression on the data axis of a mixed mesh (pipeline2 x data2, world 4), in the real
loop under torchrun: the same compressed data-parallel math as the plain data2 run of the same
student, and a resume from its checkpoint (with every rank's residuals) ends at the uninterrupted
run's weights.

Why data2 is the reference: pipeline stages hold whole tensors, so the hook's per-tensor top-k
picks the same entries of the same summed gradient as under plain data parallelism; only the
bucket grouping and the summation order differ (the Llama student's head is untied, and every
training row fills maxSeqLength, so both layouts weigh tokens alike)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.trainer.checkpoint import MANIFEST
from tests.trainer import helpers

from .test_loop_tp_pp import EVERY, STEPS, _assert_same_student, _resume_from, _run, _write_job

# Clipping is off: the hook's local clipping takes each rank's share of maxGradNorm by the entries
# its DDP holds, which a pipeline stage and a whole replica count differently.
NO_CLIP = {"distillation": {"maxGradNorm": 0.0}}
COMPRESSION = {"gradientCompression": {"topK": 0.1, "warmupSteps": 1, "rampSteps": 1, "freezeVariance": False}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    helpers.save_model(helpers.llama(len(tok), layers=4, width=32, heads=4, kv_heads=2), tok, root / "teacher")
    # Every text is longer than maxSeqLength: each rank's rows have the same token count, so the
    # per-rank mean loss of plain data parallelism equals the split student's global token mean.
    paras = [p for _, p in helpers.pydoc_paragraphs(600)]
    texts, current = [], ""
    for para in paras:
        current = f"{current} {para}".strip()
        if len(current) >= 1500:
            texts.append(current)
            current = ""
    assert len(texts) >= 48
    helpers.write_jsonl(root / "data" / "train.jsonl", [{"text": t} for t in texts])
    return root


def _job(root: Path, name: str, **layout: int) -> Path:
    data, pipeline = layout.get("data", 1), layout.get("pipeline", 1)
    parallelism = {"nodes": data * pipeline, "gpusPerNode": 0, "student": {"data": data, "pipeline": pipeline}}
    return _write_job(
        root,
        name,
        spec={"parallelism": {**parallelism, **COMPRESSION}, "quantization": {"mode": "none"}, **NO_CLIP},
        **layout,
    )


def test_pipeline2_x_data2_compressed_equals_data2_compressed_and_resumes(root: Path) -> None:
    ref_out = root / "out-dp2"
    ref, _ = _run(_job(root, "dp2", data=2), ref_out, 2)
    mixed_out = root / "out-pp2dp2"
    mixed, _ = _run(_job(root, "pp2dp2", data=2, pipeline=2), mixed_out, 4)

    assert [s["step"] for s in mixed] == list(range(1, STEPS + 1))
    assert [s["step"] for s in ref] == list(range(1, STEPS + 1))
    # (Plain data parallelism reports rank 0's own loss, the split student the global mean: the
    # weights are what must agree.)
    _assert_same_student(mixed_out, ref_out)

    # Control: compression really changed the run (the dense pp2dp2 run ends elsewhere).
    dense_out = root / "out-pp2dp2-dense"
    dense_job = _write_job(root, "pp2dp2-dense", data=2, pipeline=2, spec={"quantization": {"mode": "none"}})
    _run(dense_job, dense_out, 4)
    a = load_file(str(mixed_out / "student" / "model.safetensors"))
    d = load_file(str(dense_out / "student" / "model.safetensors"))
    assert max(float((a[k] - d[k]).abs().max()) for k in a) > 1e-4

    # Every rank's residuals (its own stage's tensors) are in the checkpoint.
    saved = load_file(str(mixed_out / "checkpoints" / f"step-{EVERY:09d}" / "compression.safetensors"))
    assert sorted(saved) == ["hook_step", "rank0", "rank1", "rank2", "rank3", "world"]
    assert int(saved["hook_step"][0]) == EVERY and int(saved["world"][0]) == 4
    assert all(float(saved[f"rank{r}"].abs().sum()) > 0 for r in range(4))

    # Resumed from step 3, residuals included: the uninterrupted run's losses and weights.
    resumed = root / "out-pp2dp2-resumed"
    _resume_from(mixed_out, EVERY, resumed)
    steps, result = _run(_job(root, "pp2dp2", data=2, pipeline=2), resumed, 4)
    assert result["resumedFrom"] == EVERY
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in mixed[EVERY:]], rel=2e-5, abs=2e-6)
    b = load_file(str(resumed / "student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    # Control: the same resume without the residuals follows another trajectory.
    lost = root / "out-pp2dp2-lost"
    _resume_from(mixed_out, EVERY, lost)
    ckpt = lost / "checkpoints" / f"step-{EVERY:09d}"
    (ckpt / "compression.safetensors").unlink()
    manifest = json.loads((ckpt / MANIFEST).read_text())
    del manifest["files"]["compression.safetensors"]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    _run(_job(root, "pp2dp2", data=2, pipeline=2), lost, 4)
    c = load_file(str(lost / "student" / "model.safetensors"))
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4
