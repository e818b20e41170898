"""Model loading for both tasks and every source kind, fromTeacher layer copying, vocabulary checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kdistill.api import parse_job
from kdistill.api.failures import ExitCode
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.models import copy_teacher_layers, derive_student_config, evenly_spaced_layers, load_models
from kdistill.trainer.sources import resolve_source

from . import helpers


def spec_for(task: str, teacher: str, student: dict | None = None):  # type: ignore[no-untyped-def]
    job = helpers.job_dict("t", task, teacher, "train.jsonl", None, student=student)
    return parse_job(job).spec


def test_resolve_source_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDISTILL_PVC_ROOT", str(tmp_path / "mnt"))
    assert resolve_source("pvc://models/teacher", tmp_path) == tmp_path / "mnt" / "models" / "teacher"
    assert resolve_source("sub/model", tmp_path / "jobs") == tmp_path / "jobs" / "sub" / "model"
    assert resolve_source("/abs/model", tmp_path) == Path("/abs/model")


def test_hf_source_fails_fast_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(TrainerError) as err:
        resolve_source("hf://someone/some-model@main", tmp_path)
    assert err.value.code == ExitCode.NETWORK_REQUIRED
    assert "hf://someone/some-model@main" in err.value.message and "pvc://" in err.value.message
    assert time.monotonic() - started < 10


def test_hf_source_probe_without_offline_flag_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine reaches package registries only: the hub probe must fail within its timeout.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(TrainerError) as err:
        load_models(spec_for("causal-lm", "hf://someone/some-model"), tmp_path)
    assert err.value.code in (ExitCode.NETWORK_REQUIRED, ExitCode.MODEL_NOT_FOUND)
    assert time.monotonic() - started < 30


def test_loads_causal_teacher_from_pvc_and_copies_layers(
    gpt2_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pvc"
    (root / "models").mkdir(parents=True)
    (root / "models" / "teacher").symlink_to(gpt2_teacher)
    monkeypatch.setenv("KDISTILL_PVC_ROOT", str(root))
    models = load_models(spec_for("causal-lm", "pvc://models/teacher"), tmp_path)
    assert type(models.teacher).__name__ == "GPT2LMHeadModel"
    assert not models.teacher.training and not any(p.requires_grad for p in models.teacher.parameters())
    assert models.student.config.n_layer == 2 and models.copied_layers == [1, 3]
    t, s = models.teacher.state_dict(), models.student.state_dict()
    for s_layer, t_layer in enumerate(models.copied_layers):
        assert torch.equal(
            s[f"transformer.h.{s_layer}.attn.c_attn.weight"], t[f"transformer.h.{t_layer}.attn.c_attn.weight"]
        )
        assert torch.equal(s[f"transformer.h.{s_layer}.mlp.c_fc.weight"], t[f"transformer.h.{t_layer}.mlp.c_fc.weight"])
    assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"])
    assert torch.equal(s["transformer.ln_f.weight"], t["transformer.ln_f.weight"])
    # The copied student computes something: its first copied block equals the teacher's.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        th = models.teacher(ids, output_hidden_states=True).hidden_states
    assert th is not None


def test_loads_classifier_from_relative_path(bert_teacher: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cls").symlink_to(bert_teacher)
    models = load_models(spec_for("sequence-classification", "../models/cls"), jobs)
    assert type(models.teacher).__name__ == "BertForSequenceClassification"
    assert models.student.config.num_hidden_layers == 2 and models.student.config.num_labels == 3
    t, s = models.teacher.state_dict(), models.student.state_dict()
    assert torch.equal(
        s["bert.encoder.layer.0.attention.self.query.weight"], t["bert.encoder.layer.1.attention.self.query.weight"]
    )
    assert torch.equal(s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])


def test_llama_family_layer_copy_and_fresh_init() -> None:
    teacher = helpers.llama(vocab=64, layers=6, width=32, heads=4, kv_heads=2)
    cfg, kept = derive_student_config(
        teacher.config,
        parse_job(
            helpers.job_dict("t", "causal-lm", "x", "y", None, student={"fromTeacher": {"numLayers": 3}})
        ).spec.student.from_teacher,
    )
    assert kept == [1, 3, 5] and cfg.num_hidden_layers == 3
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(cfg)
    copy_teacher_layers(student, teacher, kept)
    assert torch.equal(student.model.layers[2].self_attn.k_proj.weight, teacher.model.layers[5].self_attn.k_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    narrow = parse_job(
        helpers.job_dict(
            "t",
            "causal-lm",
            "x",
            "y",
            None,
            student={"fromTeacher": {"numLayers": 2, "hiddenSize": 16, "numAttentionHeads": 2}},
        )
    ).spec.student.from_teacher
    cfg2, kept2 = derive_student_config(teacher.config, narrow)
    assert kept2 == [] and cfg2.hidden_size == 16 and cfg2.num_attention_heads == 2
    assert cfg2.num_key_value_heads == 1 and cfg2.intermediate_size == 32 and cfg2.head_dim == 8
    fresh = AutoModelForCausalLM.from_config(cfg2)
    assert fresh(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_narrow_student_is_fresh_init(gpt2_teacher: Path, tmp_path: Path) -> None:
    spec = spec_for(
        "causal-lm", str(gpt2_teacher), {"fromTeacher": {"numLayers": 2, "hiddenSize": 16, "numAttentionHeads": 2}}
    )
    models = load_models(spec, tmp_path)
    assert models.copied_layers == [] and models.student.config.n_embd == 16
    assert type(models.student) is type(models.teacher)


def test_evenly_spaced_layers() -> None:
    assert evenly_spaced_layers(6, 12) == [1, 3, 5, 7, 9, 11]
    assert evenly_spaced_layers(1, 4) == [3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        evenly_spaced_layers(5, 4)


def test_too_many_layers_is_a_bad_spec(gpt2_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainerError) as err:
        load_models(spec_for("causal-lm", str(gpt2_teacher), {"fromTeacher": {"numLayers": 9}}), tmp_path)
    assert err.value.code == ExitCode.BAD_SPEC and "9" in err.value.message


def test_explicit_student_must_share_vocabulary(gpt2_teacher: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = helpers.save_model(helpers.gpt2(len(tokenizer), layers=1, seed=3), tokenizer, tmp_path / "good")
    models = load_models(spec_for("causal-lm", str(gpt2_teacher), {"model": str(good)}), tmp_path)
    assert models.student.config.n_layer == 1
    bad = tmp_path / "bad"
    helpers.gpt2(len(tokenizer) + 7, layers=1).save_pretrained(str(bad))
    with pytest.raises(TrainerError) as err:
        load_models(spec_for("causal-lm", str(gpt2_teacher), {"model": str(bad)}), tmp_path)
    assert err.value.code == ExitCode.BAD_SPEC and "vocabulary" in err.value.message
    # Same size, different token→id mapping: two ids swapped in the teacher's own tokenizer.
    remap = helpers.save_model(helpers.gpt2(len(tokenizer), layers=1), tokenizer, tmp_path / "remap")
    tok_json = json.loads((remap / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (remap / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(TrainerError) as err2:
        load_models(spec_for("causal-lm", str(gpt2_teacher), {"model": str(remap)}), tmp_path)
    assert err2.value.code == ExitCode.BAD_SPEC and "differently" in err2.value.message


def test_missing_model_and_pickle_only_weights(tmp_path: Path, tokenizer, gpt2_teacher: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainerError) as err:
        load_models(spec_for("causal-lm", str(tmp_path / "nope")), tmp_path)
    assert err.value.code == ExitCode.MODEL_NOT_FOUND
    pickled = tmp_path / "pickled"
    model = helpers.gpt2(len(tokenizer))
    pickled.mkdir(exist_ok=True)
    model.config.save_pretrained(str(pickled))
    tokenizer.save_pretrained(str(pickled))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(TrainerError) as err2:
        load_models(spec_for("causal-lm", str(pickled)), tmp_path)
    assert err2.value.code == ExitCode.MODEL_NOT_FOUND
