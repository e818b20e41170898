"""A split student created on the meta device and filled rank by rank from its safetensors
(``trainer/parallel/meta_load.py``), and the trained student streamed to rank 0 shard by shard
(``trainer/parallel/student_save.py``), on real gloo processes.

Each layout runs today's path (every rank loads the whole student, then cuts it) and the meta
path side by side in the same processes: the pieces, buffers, losses and trained weights must be
identical; the slice reader's log shows that no rank read a whole tensor-parallel parameter or a
block of another stage; the streamed folder loads with ``from_pretrained`` and equals both the
gathered student and the single-process run of the same two steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kdistill.trainer.parallel.student import tp_shard_of

from .harness import run_ranks
from .meta_workers import LENGTH, LR, ROWS
from .models import tiny_model
from .workers import student_batch, token_loss

LAYOUTS = {
    "gpt2-tensor2": ("gpt2", 2, 1),
    "llama-tensor2": ("llama", 2, 1),
    "gpt2-pipeline2": ("gpt2", 1, 2),  # GPT2's head is tied to its embedding: a copy per end stage
    "llama-pipeline2": ("llama", 1, 2),
    "gpt2-tensor2xpipeline2": ("gpt2", 2, 2),
    "llama-tensor2xpipeline2": ("llama", 2, 2),
}
LAYER = re.compile(r"\.(?:h|layers)\.(\d+)\.")


def _single_process(folder: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same two SGD steps on the whole student in this process (the global token mean)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids, mask, labels, teacher = student_batch(ROWS, LENGTH)
    losses = []
    for _ in range(2):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        per_token = token_loss(logits, teacher, labels).masked_fill(labels == -100, 0.0)
        loss = per_token.sum() / (labels != -100).sum()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-LR)
                p.grad = None
        losses.append(float(loss.detach()))
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def _file_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_meta_loaded_split_student_equals_todays_and_streams(tmp_path: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    family, tensor, pipeline = LAYOUTS[name]
    model = tiny_model(family, layers=4)
    model.save_pretrained(str(tmp_path / "model"))
    run_ranks(
        tensor * pipeline,
        "tests.parallel.meta_workers:meta_vs_today",
        tmp_path,
        {
            "tensor": tensor,
            "pipeline": pipeline,
            "shard_bytes": 40_000,  # several shard files even for a tiny student
        },
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(tensor * pipeline)]

    # 1. Today's split student and the meta-loaded one: identical pieces, losses and weights.
    for r in range(tensor * pipeline):
        saved = load_file(str(tmp_path / f"params{r}.safetensors"))
        olds = {k[4:]: v for k, v in saved.items() if k.startswith("old.")}
        assert olds and set(olds) == {k[4:] for k in saved if k.startswith("new.")}
        for k, v in olds.items():
            torch.testing.assert_close(saved[f"new.{k}"], v, rtol=0, atol=1e-5, msg=k)
    losses = ranks[0]["losses"]
    assert [old for old, _ in losses] == pytest.approx([new for _, new in losses], rel=0, abs=1e-5)

    # 2. What each rank read: only its slices, never a whole sharded tensor, only its blocks.
    shapes = _file_shapes(tmp_path / "model")
    n_layers = 4
    for r in ranks:
        assert r["reads"], "the meta path read nothing"
        layers_read = set()
        for key, shape in r["reads"]:
            full = shapes[key]
            if tensor > 1 and tp_shard_of(key) is not None:
                assert torch.Size(shape).numel() * tensor == torch.Size(full).numel(), (key, shape, full)
            else:
                assert tuple(shape) == full, key
            if m := LAYER.search(key):
                layers_read.add(int(m[1]))
        if pipeline > 1:
            assert 0 < len(layers_read) < n_layers, layers_read

    # 3. The streamed folder: sharded as save_pretrained shards, loads, and is the gathered
    # student exactly and the single-process run to 1e-5.
    streamed = tmp_path / "streamed"
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    files = sorted(streamed.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(shapes)  # the keys save_pretrained wrote
    loaded = AutoModelForCausalLM.from_pretrained(str(streamed), dtype=torch.float32)
    state = loaded.state_dict()
    gathered = load_file(str(tmp_path / "gathered.safetensors"))
    for k, v in gathered.items():
        assert torch.equal(state[k], v), k
    ref_losses, ref_state = _single_process(tmp_path / "model")
    assert [new for _, new in losses] == pytest.approx(ref_losses, rel=0, abs=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5, msg=k)
