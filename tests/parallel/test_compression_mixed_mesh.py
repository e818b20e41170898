"""Top-k compression on the data axis of a mixed mesh (tensor2 x data2, world 4), in the real
loop under torchrun: the hook sits on the DDP of the data axis, every rank keeps the residuals of
its own tensor shard, the checkpoint holds all four, and a resume from it ends at the
uninterrupted run's losses and weights; without the residuals it does not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.trainer.checkpoint import MANIFEST
from tests.trainer import helpers

from .test_loop_tp_pp import EVERY, STEPS, _resume_from, _run, _write_job

# Two dense steps (the variance AdamW freezes), then top-k: the step-3 checkpoint holds residuals.
COMPRESSION = {"gradientCompression": {"topK": 0.1, "warmupSteps": 2}}
LAYOUT = {"nodes": 4, "gpusPerNode": 0, "student": {"data": 2, "tensor": 2}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    texts = [p for _, p in helpers.pydoc_paragraphs(300)]
    tok = helpers.make_tokenizer(root / "tok", texts)
    helpers.save_model(helpers.llama(len(tok), layers=4, width=32, heads=4, kv_heads=2), tok, root / "teacher")
    helpers.causal_data(root / "data", n_train=96, n_eval=16)
    return root


def _job(root: Path, name: str, compression: dict | None) -> Path:
    parallelism = {**LAYOUT, **(compression or {})}
    return _write_job(root, name, data=2, tensor=2, spec={"parallelism": parallelism, "quantization": {"mode": "none"}})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return helpers.load_student(out / "student")


def test_tensor2_x_data2_compresses_the_data_axis_and_resumes_with_residuals(root: Path) -> None:
    out = root / "out-compressed"
    steps, _ = _run(_job(root, "compressed", COMPRESSION), out, 4)
    dense_out = root / "out-dense"
    dense, _ = _run(_job(root, "dense", None), dense_out, 4)

    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    losses = [s["loss"] for s in steps]
    assert all(math.isfinite(x) for x in losses)
    # Dense steps are the dense run's; compressed ones stay near it (no blow-up), but differ.
    assert losses[:2] == pytest.approx([s["loss"] for s in dense[:2]], rel=2e-5, abs=2e-6)
    assert losses[2:] == pytest.approx([s["loss"] for s in dense[2:]], rel=0.1)
    a, d = _weights(out), _weights(dense_out)
    assert max(float((a[k] - d[k]).abs().max()) for k in a) > 1e-4

    # Every rank wrote its residuals (of its own shards) into the checkpoint, one file each.
    saved = {}
    for r in range(4):
        mine = load_file(str(out / "checkpoints" / f"step-{EVERY:09d}" / f"compression-rank{r}.safetensors"))
        assert sorted(mine) == ["hook_step", f"momentum_rank{r}", f"rank{r}", "world"]
        assert int(mine["hook_step"][0]) == EVERY and int(mine["world"][0]) == 4
        saved[f"rank{r}"] = mine[f"rank{r}"]
        assert float(mine[f"momentum_rank{r}"].abs().sum()) > 0  # compress: momentum, each rank's own
    assert all(float(saved[f"rank{r}"].abs().sum()) > 0 for r in range(4))
    # Each its own: data peers saw other rows, tensor peers hold other shards.
    assert not any(torch.equal(saved[f"rank{i}"], saved[f"rank{j}"]) for i in range(4) for j in range(i + 1, 4))

    # Resumed from step 3, residuals included: the uninterrupted run's losses and weights.
    resumed = root / "out-resumed"
    _resume_from(out, EVERY, resumed)
    again, result = _run(_job(root, "compressed", COMPRESSION), resumed, 4)
    assert result["resumedFrom"] == EVERY
    assert [s["loss"] for s in again] == pytest.approx(losses[EVERY:], rel=2e-5, abs=2e-6)
    b = _weights(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    # Control: the same resume without the residuals follows another trajectory.
    lost = root / "out-lost"
    _resume_from(out, EVERY, lost)
    ckpt = lost / "checkpoints" / f"step-{EVERY:09d}"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for r in range(4):
        (ckpt / f"compression-rank{r}.safetensors").unlink()
        del manifest["files"][f"compression-rank{r}.safetensors"]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    _run(_job(root, "compressed", COMPRESSION), lost, 4)
    c = _weights(lost)
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4
