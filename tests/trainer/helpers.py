"""Real tiny models, tokenizers, data and job files for trainer tests, built locally from configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml


def pydoc_paragraphs(limit: int = 400, min_chars: int = 40) -> list[tuple[str, str]]:
    """(topic, paragraph) pairs from Python's own documentation text, which ships with CPython."""
    from pydoc_data.topics import topics

    out: list[tuple[str, str]] = []
    for topic in sorted(topics):
        for para in topics[topic].split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= min_chars:
                out.append((topic, text[:400]))
    return out[:limit]


def make_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` and saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|eos|>", "[CLS]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    fast.save_pretrained(str(out_dir))
    return fast


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def gpt2(
    vocab: int,
    layers: int = 4,
    width: int = 32,
    heads: int = 4,
    task: str = "causal-lm",
    num_labels: int = 2,
    seed: int = 0,
) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=128,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        num_labels=num_labels,
    )
    return GPT2LMHeadModel(cfg) if task == "causal-lm" else GPT2ForSequenceClassification(cfg)


def llama(
    vocab: int,
    layers: int = 4,
    width: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    task: str = "causal-lm",
    num_labels: int = 2,
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        num_labels=num_labels,
    )
    return LlamaForCausalLM(cfg) if task == "causal-lm" else LlamaForSequenceClassification(cfg)


def bert(
    vocab: int, layers: int = 4, width: int = 32, heads: int = 4, num_labels: int = 3, seed: int = 0
) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        max_position_embeddings=128,
        pad_token_id=0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def causal_data(root: Path, n_train: int = 120, n_eval: int = 30) -> tuple[Path, Path]:
    paras = [p for _, p in pydoc_paragraphs(n_train + n_eval)]
    train = write_jsonl(root / "train.jsonl", [{"text": t} for t in paras[:n_train]])
    ev = write_jsonl(root / "eval.jsonl", [{"text": t} for t in paras[n_train : n_train + n_eval]])
    return train, ev


def classification_data(root: Path, topics: tuple[str, ...] = ("assignment", "class", "for")) -> tuple[Path, Path]:
    """Paragraphs labelled by the pydoc topic they come from."""
    from pydoc_data.topics import topics as all_topics

    rows = []
    for topic in topics:
        for para in all_topics[topic].split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= 30:
                rows.append({"text": text[:300], "label": topic})
    rows = rows[::2] + rows[1::2]  # interleave so eval holds every label
    cut = int(len(rows) * 0.8)
    return write_jsonl(root / "train.jsonl", rows[:cut]), write_jsonl(root / "eval.jsonl", rows[cut:])


def job_dict(
    name: str,
    task: str,
    teacher: str,
    train: str,
    eval_: str | None,
    *,
    student: dict[str, Any] | None = None,
    stages: list[dict[str, Any]] | None = None,
    quantization: str = "none",
    batch_size: int = 4,
    every_steps: int = 5,
    extra_distillation: dict[str, Any] | None = None,
    extra_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": task,
            "teacher": {"model": teacher, "dtype": "float32"},
            "student": student or {"fromTeacher": {"numLayers": 2}},
            "data": {"train": train, **({"eval": eval_} if eval_ else {}), "maxSeqLength": 48, **(extra_data or {})},
            "distillation": {
                "stages": stages or [{"name": "output", "steps": 6, "objectives": ["logits"]}],
                "batchSize": batch_size,
                "learningRate": 1e-3,
                "warmupSteps": 2,
                **(extra_distillation or {}),
            },
            "quantization": {"mode": quantization},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": every_steps, "keep": 2},
            "serving": {"enabled": eval_ is not None},
        },
    }


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def load_student(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a student folder: one ``model.safetensors`` (``save_pretrained`` of a
    whole student) or the shards listed by ``model.safetensors.index.json`` (a split student,
    streamed)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / name)))
    assert set(out) == set(index["weight_map"]), "the shards do not hold what the index lists"
    return out
