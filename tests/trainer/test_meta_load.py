"""trainer/parallel/meta_load.py in one process: the meta-device student, its buffers, slices of
safetensors files (single and sharded, GPT2's fused q/k/v sections), and the errors a bad
weight folder gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdistill.api.failures import ExitCode
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.parallel.meta_load import (
    SliceReader,
    WeightSource,
    build_on_meta,
    empty_params,
    is_meta_model,
    materialize,
    meta_qkv_dims,
)
from kdistill.trainer.parallel.student import shard_piece
from tests.parallel.models import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meta_student_has_real_buffers_and_no_real_parameters(family: str) -> None:
    from kdistill.trainer.aux_modules import probe_qkv_dims

    model = tiny_model(family, layers=2)
    meta = build_on_meta(model.config, "causal-lm")
    assert is_meta_model(meta) and all(p.is_meta for p in meta.parameters())
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in model.named_parameters()]
    buffers = dict(meta.named_buffers())
    for name, value in model.named_buffers():  # rotary inv_freq: computed for real, from the config
        assert not buffers[name].is_meta and torch.equal(buffers[name], value), name
    assert meta_qkv_dims(meta) == probe_qkv_dims(model, [0], 0, torch.device("cpu"))


def test_slices_of_a_sharded_folder_equal_the_cut_of_the_whole_tensor(tmp_path: Path) -> None:
    model = tiny_model("gpt2", layers=2)
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    source = WeightSource.of(tmp_path, prefix="transformer")
    reader = SliceReader(source)
    whole = model.state_dict()
    try:
        key = "transformer.h.1.attn.c_attn.weight"  # [in, 3 * out]: q | k | v along dim 1
        for rank in range(2):
            piece = reader.read(key, (1, 3, 2, rank))
            assert torch.equal(piece, shard_piece(whole[key], 1, 3, 2, rank))
        assert reader.read("transformer.wte.weight", None).shape == whole["transformer.wte.weight"].shape
    finally:
        reader.close()
    assert reader.reads[0] == (key, (32, 48))  # half of each of the three 32-wide sections
    # Older checkpoints leave the base prefix out of their keys.
    assert source.key("transformer.h.0.ln_1.weight") == "transformer.h.0.ln_1.weight"
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({"h.0.ln_1.weight": torch.ones(32)}, str(bare / "model.safetensors"))
    assert WeightSource.of(bare, prefix="transformer").key("transformer.h.0.ln_1.weight") == "h.0.ln_1.weight"


def test_layer_map_reads_student_blocks_from_teacher_blocks(tmp_path: Path) -> None:
    teacher = tiny_model("llama", layers=4)
    teacher.save_pretrained(str(tmp_path))
    cfg = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 2})
    student = build_on_meta(cfg, "causal-lm")
    materialize(
        student,
        SliceReader(WeightSource.of(tmp_path, layer_map=[1, 3])),
        device=torch.device("cpu"),
        plain_cut=lambda name: None,
        aliases={},
    )
    files = load_file(str(tmp_path / "model.safetensors"))
    got = student.state_dict()
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], files["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], files["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(got["lm_head.weight"], files["lm_head.weight"])


def test_a_missing_or_misshapen_tensor_is_refused_by_name(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    model.save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    student = build_on_meta(model.config, "causal-lm")
    with pytest.raises(TrainerError) as err:
        materialize(
            student,
            SliceReader(WeightSource.of(tmp_path)),
            device=torch.device("cpu"),
            plain_cut=lambda name: None,
            aliases={},
        )
    assert err.value.code == ExitCode.MODEL_NOT_FOUND and "model.layers.1.mlp.down_proj.weight" in err.value.message

    weights["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(TrainerError, match=r"down_proj.weight .*read \(3, 3\)"):
        materialize(
            build_on_meta(model.config, "causal-lm"),
            SliceReader(WeightSource.of(tmp_path)),
            device=torch.device("cpu"),
            plain_cut=lambda name: None,
            aliases={},
        )
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weights": {}}))
    with pytest.raises(TrainerError, match="is not a safetensors index"):
        WeightSource.of(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(TrainerError, match="holds no safetensors weights"):
        WeightSource.of(tmp_path)


def test_empty_params_keep_a_tied_head_tied() -> None:
    meta = build_on_meta(tiny_model("gpt2", layers=1).config, "causal-lm")
    model = empty_params(meta)
    assert not is_meta_model(model)
    assert model.lm_head.weight is model.transformer.wte.weight
