"""Top-k compression with pipeline stages (pipeline2 x data2, world 4) in the real loop under
torchrun: the same compression as on the unsplit student at the same data-parallel degree (data2),
weight for weight but for top-k's near ties, with a tied embedding/LM head held by both end stages;
and a resume from its checkpoint (residuals included) ends at the uninterrupted run's losses and
weights (1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer import helpers

from .test_loop_tp_pp import EVERY, STEPS, _resume_from, _run, _write_job, write_gpt2_root

# Two dense steps, then top-k at 10% with the spec's other defaults (local clipping, frozen
# variance, update-ranked selection): steps 3-6 are compressed, the step-3 checkpoint holds residuals.
COMPRESSION = {"gradientCompression": {"topK": 0.1, "warmupSteps": 2}}
LR = 5e-3  # test_loop_tp_pp's jobs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt2_root(tmp_path_factory.mktemp("pp-topk"))


def _job(root: Path, name: str, pipeline: int, top_k: bool = True) -> Path:
    world = 2 * pipeline
    parallelism = {"nodes": world, "gpusPerNode": 0, "student": {"data": 2, "pipeline": pipeline}}
    if top_k:
        parallelism.update(COMPRESSION)
    # Rows cut to 8 tokens (every row is longer): both data ranks hold as many tokens, so the
    # unsplit student's mean of per-rank means is the split student's global token mean.
    spec = {"parallelism": parallelism, "quantization": {"mode": "none"}, "data": {"maxSeqLength": 8}}
    return _write_job(root, name, data=2, pipeline=pipeline, spec=spec)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return helpers.load_student(out / "student")


def _same_but_near_ties(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 but for a few entries per tensor. The two layouts compute the same gradients
    in another summation order (the pipeline adds two micro-batches; dense runs of the two agree
    to ~4e-6), and top-k is discontinuous: an entry next to a tensor's k-th largest can swap with
    it. Such an entry is sent a step earlier or later, so it lands within a few learning-rate
    steps. A whole tensor compressed otherwise (a tied weight compressed in two parts, or clipped
    by one stage's norm) moves most of its entries instead."""
    assert a.keys() == b.keys()
    for k in a:
        off = (a[k] - b[k]).abs() > 1e-5 + 1e-5 * b[k].abs()
        assert int(off.sum()) <= max(1, a[k].numel() // 200), (k, int(off.sum()), a[k].numel())
        assert float((a[k] - b[k]).abs().max()) < 4 * LR, k


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_pipeline2_x_data2_compresses_like_data2_and_resumes(root: Path) -> None:
    flat_out, piped_out = root / "out-data2", root / "out-pp2"
    flat, _ = _run(_job(root, "data2", 1), flat_out, 2)
    piped, _ = _run(_job(root, "pp2", 2), piped_out, 4)
    assert [s["step"] for s in piped] == list(range(1, STEPS + 1)) == [s["step"] for s in flat]
    # The unsplit loop logs rank 0's own loss, the split one the global mean: the weights carry
    # the comparison (every step's applied gradient is in them).
    a = _weights(flat_out)
    _same_but_near_ties(a, _weights(piped_out))

    # The control: the dense run is far from the compressed one in most entries of every matrix,
    # so the check above has teeth.
    dense_out = root / "out-dense"
    _run(_job(root, "dense", 1, top_k=False), dense_out, 2)
    d = _weights(dense_out)
    # (Position embeddings: rows of 8 tokens train 8 of its 128 rows, the rest never move.)
    for k in (k for k in a if a[k].dim() == 2 and "wpe" not in k):
        assert int(((a[k] - d[k]).abs() > 1e-5 + 1e-5 * d[k].abs()).sum()) > a[k].numel() // 2, k

    # The step-3 checkpoint holds every rank's residuals; resumed from it, the pipelined run ends
    # at the uninterrupted run's losses and weights.
    ckpt = piped_out / "checkpoints" / f"step-{EVERY:09d}"
    for r in range(4):  # the sharded checkpoint: each rank's own residual file
        saved = load_file(str(ckpt / f"compression-rank{r}.safetensors"))
        assert sorted(saved) == ["hook_step", f"momentum_rank{r}", f"rank{r}", "world"]
        assert float(saved[f"rank{r}"].abs().sum()) > 0
    resumed = root / "out-resumed"
    _resume_from(piped_out, EVERY, resumed)
    again, result = _run(_job(root, "pp2", 2), resumed, 4)
    assert result["resumedFrom"] == EVERY
    assert [s["loss"] for s in again] == pytest.approx([s["loss"] for s in piped[EVERY:]], rel=1e-5, abs=1e-6)
    _same(_weights(piped_out), _weights(resumed))
