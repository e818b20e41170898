"""The split teacher delivers more than logits: hidden states and q/k/v of chosen layers equal
the unsplit teacher's (real gloo processes), and a real 2-process ``kdistill run`` with hidden and
attention stages and ``teacherPipelineStages: 2`` completes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kdistill.trainer.parallel.distributed import DistEnv
from kdistill.trainer.parallel.mesh import MeshLayout
from kdistill.trainer.parallel.teacher_pipeline import SplitTeacher, TeacherRequest
from kdistill.trainer.qkv_capture import QKVCapture

from .harness import REPO, run_ranks
from .jobs import make_job
from .models import batch, tiny_model

LAYERS = 5


def outputs_worker(env: DistEnv, workdir: Path, args: dict) -> None:
    """One rank: its share of the teacher, then every hidden index and every layer's q/k/v."""
    model = tiny_model(args["family"], layers=LAYERS)
    layout = MeshLayout(env.world_size, 1, env.world_size, 1, args["stages"])
    teacher = SplitTeacher(model, layout.teacher_group(env.rank), env.rank, micro_batch_rows=args.get("micro"))
    ids, mask = batch(seed=env.rank, rows=2 + env.rank, length=9 + env.rank)
    request = TeacherRequest(logits=args["logits"], hidden=tuple(args["hidden"]), qkv=tuple(args["qkv"]))
    out = teacher.forward(ids, mask, request)
    tensors = {"ids": ids, "mask": mask}
    if out.logits is not None:
        tensors["logits"] = out.logits
    tensors.update({f"hidden{i}": h for i, h in out.hidden.items()})
    for layer, qkv in out.qkv.items():
        tensors.update({f"{n}{layer}": t.contiguous() for n, t in zip("qkv", qkv, strict=True)})
    save_file(tensors, str(workdir / f"rank{env.rank}.safetensors"))


@pytest.mark.parametrize(
    ("family", "world", "stages", "micro"), [("gpt2", 2, 2, None), ("llama", 3, 3, 1), ("llama", 4, 2, None)]
)
def test_split_teacher_hidden_states_and_qkv_match_unsplit(
    tmp_path: Path, family: str, world: int, stages: int, micro: int | None
) -> None:
    hidden = list(range(LAYERS + 1))  # the embeddings, every block, the final (normed) state
    qkv = [0, 2, LAYERS - 1]
    run_ranks(
        world,
        "tests.parallel.test_teacher_split_outputs:outputs_worker",
        tmp_path,
        {"family": family, "stages": stages, "micro": micro, "logits": True, "hidden": hidden, "qkv": qkv},
        timeout=900,
    )
    full = tiny_model(family, layers=LAYERS).eval()
    for rank in range(world):
        out = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        with torch.no_grad(), QKVCapture(full, qkv) as cap:
            ref = full(input_ids=out["ids"], attention_mask=out["mask"], output_hidden_states=True)
        valid = out["mask"].bool()
        torch.testing.assert_close(out["logits"][valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
        assert len(ref.hidden_states) == LAYERS + 1
        for i in hidden:
            assert out[f"hidden{i}"].shape == ref.hidden_states[i].shape, (rank, i)
            torch.testing.assert_close(out[f"hidden{i}"][valid], ref.hidden_states[i][valid], rtol=1e-5, atol=1e-5)
        for layer in qkv:
            for n, t in zip("qkv", cap.qkv[layer], strict=True):
                torch.testing.assert_close(out[f"{n}{layer}"][valid], t[valid], rtol=1e-5, atol=1e-5)


def test_split_teacher_sends_only_what_is_asked(tmp_path: Path) -> None:
    run_ranks(
        2,
        "tests.parallel.test_teacher_split_outputs:outputs_worker",
        tmp_path,
        {"family": "gpt2", "stages": 2, "logits": False, "hidden": [1, LAYERS], "qkv": []},
        timeout=900,
    )
    for rank in range(2):
        out = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert sorted(out) == ["hidden1", f"hidden{LAYERS}", "ids", "mask"]


def test_out_of_range_requests_are_named() -> None:
    teacher = SplitTeacher(tiny_model("gpt2", layers=3), [0], 0)
    ids, mask = batch(seed=0, rows=2, length=5)
    with pytest.raises(ValueError, match=r"hidden-state indices \[4\] are outside 0..3"):
        teacher.forward(ids, mask, TeacherRequest(hidden=(4,)))
    with pytest.raises(ValueError, match=r"q/k/v layers \[3\] are outside 0..2"):
        teacher.forward(ids, mask, TeacherRequest(qkv=(3,)))
    assert teacher.qkv_dims == (32, 32, 32)


def test_kdistill_run_two_processes_hidden_and_attention_stages_with_split_teacher(tmp_path: Path) -> None:
    job_path = make_job(tmp_path / "job", world=2, steps=2, every=2, teacher_stages=2, batch_size=4)
    job = yaml.safe_load(job_path.read_text())
    job["spec"]["distillation"]["stages"] = [
        {"name": "features", "steps": 2, "objectives": ["hidden"]},
        {"name": "intermediate", "steps": 2, "objectives": ["hidden", "attention"], "attentionRank": 4},
        {"name": "output", "steps": 2, "objectives": ["logits"]},
    ]
    job_path.write_text(yaml.safe_dump(job, sort_keys=False))
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
        KDISTILL_TERMINATION_LOG=str(tmp_path / "termination.log"),
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.cli.main", "run", str(job_path), "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if '{"event": "step"' in line:
            steps.append(json.loads(line[line.index("{") :]))
    by_stage = {s["stage"]: s for s in steps}
    assert set(by_stage) == {"features", "intermediate", "output"}, steps
    parts = {name: s.get("parts", s) for name, s in by_stage.items()}
    assert "hidden" in json.dumps(parts["features"]) and "attention" in json.dumps(parts["intermediate"])
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert (out / "student" / "model.safetensors").is_file()
    # Two teacher stages: each rank logged its own share of the blocks.
    assert "teacher stage 1/2" in proc.stderr + proc.stdout and "teacher stage 2/2" in proc.stderr + proc.stdout


def test_api_accepts_split_teacher_for_classification_in_pydantic_and_cel() -> None:
    """A decoder classifier teacher splits like a causal LM (tests/parallel/test_classifier_split.py):
    neither the validator nor the CRD's CEL rules refuse teacherPipelineStages > 1 for it."""
    from kdistill.api import DistillationJobSpec
    from kdistill.api.crd import build_crd
    from tests.spec_table import with_spec

    spec = with_spec(
        task="sequence-classification",
        parallelism={"nodes": 1, "gpusPerNode": 2, "teacherPipelineStages": 2, "student": {"data": 2}},
    )["spec"]
    spec["data"]["labelField"] = "label"
    spec["distillation"] = {
        "stages": [
            {"name": "features", "steps": 5, "objectives": ["hidden", "attention"]},
            {"name": "output", "steps": 5, "objectives": ["logits"]},
        ]
    }
    DistillationJobSpec.model_validate(spec)
    rules = json.dumps(build_crd())
    assert "self.task == 'causal-lm' || self.parallelism.teacherPipelineStages == 1" not in rules
