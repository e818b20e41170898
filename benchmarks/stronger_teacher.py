"""A stronger teacher than the quickstart's, for benchmarks/kd_methods_quality.py: the same
architecture (GPT2, 4 layers, width 128) and the same tokenizer, trained longer on more text
with dropout, so that its eval perplexity on the same held-out pydoc lines is lower.

Training longer on the quickstart's small pydoc corpus alone overfits (with or without dropout
its eval perplexity passes a low and then climbs well above it: results files
``stronger_teacher_pydoc_only*.json``), so the recipe adds text that ships with Python: the
docstrings of the standard library's own sources (``trainer.corpus.build_docstring_corpus``,
~1.8 MB against the pydoc split's 0.35 MB), with every paragraph that shares an 8-word run with
the held-out split dropped, and dropout. The
pydoc training lines are repeated ``--pydoc-repeats`` times in the mix so the held-out domain
keeps a fair share. The last step's weights are the teacher: the eval split is only measured
(every ``--eval-every`` steps, for the curve), never used to pick.

    .venv/bin/python -P benchmarks/stronger_teacher.py [--pvc ./pvc] [--steps 2500] [--out FILE]
        [--no-docstrings] [--pydoc-repeats 3] [--dropout 0.1] [--weight-decay 0.1] [--name DIR]

The flags change the recipe for ablations (``--name`` keeps their model apart); ``--out``
also writes the report as a results file.

Needs the quickstart teacher and its corpus in ``--pvc`` (``make quickstart`` or
benchmarks/kd_methods_quality.py build them). Writes ``PVC/models/stronger-teacher`` (weights,
the quickstart's tokenizer, ``pretrain-report.json`` with both teachers' eval perplexity and the
eval curve) and ``PVC/data/stdlib-docstrings.jsonl``. Deterministic for a given seed, Python
version and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAME = "stronger-teacher"


@dataclass
class StrongerConfig:
    layers: int = 4
    width: int = 128
    heads: int = 4
    max_length: int = 128
    steps: int = 2500
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    dropout: float = 0.1
    pydoc_repeats: int = 3
    docstrings: bool = True
    seed: int = 0


def model_for(cfg: StrongerConfig, tokenizer: Any) -> Any:
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
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
        )
    )


def build(pvc: Path, cfg: StrongerConfig, eval_every: int = 250, name: str = NAME) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from kdistill.trainer.batching import collate
    from kdistill.trainer.corpus import build_docstring_corpus
    from kdistill.trainer.data import read_jsonl, tokenize_examples
    from kdistill.trainer.evaluate import evaluate
    from kdistill.trainer.sampling import BatchSampler
    from kdistill.trainer.teacher_pretrain import PretrainConfig, lr_at

    started = time.perf_counter()
    quickstart = pvc / "models" / "quickstart-teacher"
    data = pvc / "data"
    pydoc_train, pydoc_eval = data / "pydoc-train.jsonl", data / "pydoc-eval.jsonl"
    if not (quickstart / "pretrain-report.json").is_file() or not pydoc_eval.is_file():
        raise SystemExit(f"{quickstart}: no quickstart teacher; run `make quickstart` first")

    def rows(path: Path) -> list[Any]:
        return read_jsonl(path, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)

    eval_rows = rows(pydoc_eval)
    tokenizer = AutoTokenizer.from_pretrained(str(quickstart))
    pydoc = tokenize_examples(rows(pydoc_train), tokenizer, cfg.max_length)
    extra, dropped = [], 0
    if cfg.docstrings:
        docstrings, dropped = build_docstring_corpus(data / "stdlib-docstrings.jsonl", [r.text for r in eval_rows])
        extra = tokenize_examples(rows(docstrings), tokenizer, cfg.max_length)
    train = pydoc * cfg.pydoc_repeats + extra
    ev = tokenize_examples(eval_rows, tokenizer, cfg.max_length)
    pad = int(tokenizer.pad_token_id)
    eval_batches = [collate(ev[i : i + 32], pad, "causal-lm") for i in range(0, len(ev), 32)]

    torch.manual_seed(cfg.seed)
    model = model_for(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(train, cfg.batch_size, strategy="uniform", tiers=None, shares=(1.0, 0.0, 0.0), seed=cfg.seed)
    schedule = PretrainConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps)
    curve: list[dict[str, float]] = []
    seen = 0
    model.train()
    for step in range(cfg.steps):
        batch = collate([train[i] for i in next(sampler)], pad, "causal-lm")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += int(batch["attention_mask"].sum())
        if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
            ppl = evaluate(model, eval_batches, "causal-lm", torch.device("cpu")).value
            model.train()
            point = {"step": step + 1, "loss": round(loss.item(), 4), "eval_perplexity": ppl}
            curve.append(point)
            print(
                json.dumps({"event": "step", **point, "seconds": round(time.perf_counter() - started, 1)}), flush=True
            )
    out = pvc / "models" / name
    if out.exists():
        shutil.rmtree(out)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    report = {
        "eval_perplexity": curve[-1]["eval_perplexity"],
        "quickstart_eval_perplexity": json.loads((quickstart / "pretrain-report.json").read_text())["eval_perplexity"],
        "eval_tokens": sum(int(b["attention_mask"].sum()) - b["attention_mask"].shape[0] for b in eval_batches),
        "train_lines": {"pydoc": len(pydoc), "pydoc_repeats": cfg.pydoc_repeats, "stdlib_docstrings": len(extra)},
        "paragraphs_dropped_for_eval_overlap": dropped,
        "train_tokens_seen": seen,
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "config": asdict(cfg),
    }
    (out / "pretrain-report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    p.add_argument("--steps", type=int, default=StrongerConfig.steps)
    p.add_argument("--pydoc-repeats", type=int, default=StrongerConfig.pydoc_repeats)
    p.add_argument("--dropout", type=float, default=StrongerConfig.dropout)
    p.add_argument("--weight-decay", type=float, default=StrongerConfig.weight_decay)
    p.add_argument("--no-docstrings", dest="docstrings", action="store_false", help="leave out the stdlib's docstrings")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--name", default=NAME, help="the model directory under PVC/models (another name for ablations)")
    p.add_argument("--out", type=Path, default=None, help="also write the report as a results file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_common import command_line, machine_state, write_report

    state_before = machine_state()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cfg = StrongerConfig(
        steps=args.steps,
        pydoc_repeats=args.pydoc_repeats,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        docstrings=args.docstrings,
    )
    report = build(args.pvc, cfg, args.eval_every, args.name)
    if args.out is not None:
        result = {"benchmark": "stronger_teacher", "command": command_line(), "machine_before": state_before}
        write_report({**result, "machine_after": machine_state(), **report}, args.out)
    print(json.dumps({"event": "teacher-ready", **{k: v for k, v in report.items() if k != "curve"}}), flush=True)
    if report["eval_perplexity"] >= report["quickstart_eval_perplexity"]:
        print("the stronger teacher is not better than the quickstart teacher on the eval split", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
