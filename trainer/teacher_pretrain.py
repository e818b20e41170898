"""Train the quickstart's teacher honestly: a small GPT2 learned from scratch on Python's own
documentation text (``pydoc_data``, shipped with CPython), so nothing is downloaded.

``python -m kdistill.trainer.teacher_pretrain --pvc ./pvc`` builds the corpus into
``PVC/data/pydoc-{train,eval}.jsonl``, a byte-level BPE tokenizer, and the teacher into
``PVC/models/quickstart-teacher``; it reports the teacher's eval perplexity next to a unigram
model's (token frequencies of the training split, add-one smoothed), which is the bar a model
that learned nothing from context would reach.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batching import collate
from .data import read_jsonl, tokenize_examples
from .evaluate import evaluate
from .sampling import BatchSampler


@dataclass
class PretrainConfig:
    layers: int = 4
    width: int = 128
    heads: int = 4
    vocab_size: int = 2048
    max_length: int = 128
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0


@dataclass
class PretrainReport:
    eval_perplexity: float
    unigram_perplexity: float
    eval_tokens: int
    train_tokens_seen: int
    steps: int
    seconds: float
    parameters: int


def build_corpus(pvc: Path) -> tuple[Path, Path]:
    from .corpus import build_pydoc_corpus

    data = pvc / "data"
    scratch = data / ".pydoc-build"
    train, ev = build_pydoc_corpus(scratch)
    out_train, out_eval = data / "pydoc-train.jsonl", data / "pydoc-eval.jsonl"
    train.replace(out_train)
    ev.replace(out_eval)
    shutil.rmtree(scratch, ignore_errors=True)
    return out_train, out_eval


def unigram_perplexity(train_ids: list[list[int]], eval_ids: list[list[int]], vocab: int) -> float:
    """Perplexity of predicting each eval token (after the first of its text) from train frequencies."""
    counts = Counter(t for ids in train_ids for t in ids[1:])
    total = sum(counts.values())
    nll = 0.0
    n = 0
    for ids in eval_ids:
        for t in ids[1:]:
            nll -= math.log((counts.get(t, 0) + 1) / (total + vocab))
            n += 1
    return math.exp(nll / n)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _gpt2(cfg: PretrainConfig, tokenizer: Any) -> nn.Module:
    """The teacher's architecture: a small GPT2 without dropout (the corpus is small and clean)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.max_length,
            n_embd=cfg.width,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=int(tokenizer.pad_token_id),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def pretrain(pvc: Path, cfg: PretrainConfig, log_every: int = 50) -> PretrainReport:
    from .tokenizer_build import build_tokenizer

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_path, eval_path = build_corpus(pvc)
    out_dir = pvc / "models" / "quickstart-teacher"
    train_rows = read_jsonl(train_path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    eval_rows = read_jsonl(eval_path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tokenizer = build_tokenizer([r.text for r in train_rows], cfg.vocab_size, out_dir)
    train = tokenize_examples(train_rows, tokenizer, cfg.max_length)
    ev = tokenize_examples(eval_rows, tokenizer, cfg.max_length)
    pad = int(tokenizer.pad_token_id)
    model = _gpt2(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    sampler = BatchSampler(train, cfg.batch_size, strategy="uniform", tiers=None, shares=(1.0, 0.0, 0.0), seed=cfg.seed)
    model.train()
    seen = 0
    loop_started = time.perf_counter()
    for step in range(cfg.steps):
        batch = collate([train[i] for i in next(sampler)], pad, "causal-lm")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += int(batch["attention_mask"].sum())
        if log_every and (step + 1) % log_every == 0:
            record = {
                "event": "step",
                "stage": "teacher-pretrain",
                "step": step + 1,
                "totalSteps": cfg.steps,
                "loss": round(loss.item(), 4),
                "tokensPerSecond": round(seen / (time.perf_counter() - loop_started), 1),
            }
            print(json.dumps(record), flush=True)
    eval_batches = [collate(ev[i : i + 32], pad, "causal-lm") for i in range(0, len(ev), 32)]
    result = evaluate(model, eval_batches, "causal-lm", torch.device("cpu"))
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    report = PretrainReport(
        eval_perplexity=result.value,
        unigram_perplexity=unigram_perplexity([e.input_ids for e in train], [e.input_ids for e in ev], len(tokenizer)),
        eval_tokens=result.count,
        train_tokens_seen=seen,
        steps=cfg.steps,
        seconds=round(time.perf_counter() - started, 1),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    (out_dir / "pretrain-report.json").write_text(json.dumps({**asdict(report), "config": asdict(cfg)}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdistill.trainer.teacher_pretrain", description=__doc__)
    p.add_argument("--pvc", type=Path, default=Path("pvc"), help="local stand-in for the volumes (./pvc)")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--layers", type=int, default=PretrainConfig.layers)
    p.add_argument("--width", type=int, default=PretrainConfig.width)
    p.add_argument("--vocab-size", type=int, default=PretrainConfig.vocab_size)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = PretrainConfig(steps=args.steps, layers=args.layers, width=args.width, vocab_size=args.vocab_size)
    report = pretrain(args.pvc, cfg)
    print(json.dumps({"event": "teacher-ready", **asdict(report)}), flush=True)
    if report.eval_perplexity >= report.unigram_perplexity:
        print("teacher did not beat the unigram baseline: it learned nothing from context", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
