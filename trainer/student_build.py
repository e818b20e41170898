"""Build a student with its own tokenizer, for cross-tokenizer distillation on local data.

``python -P -m kdistill.trainer.student_build --pvc ./pvc`` learns a byte-level BPE of another
size from the quickstart corpus (``PVC/data/pydoc-train.jsonl``, written by
``kdistill.trainer.teacher_pretrain``) and saves a fresh Llama-family causal LM of that
vocabulary with it in ``PVC/models/other-tokenizer-student``: a student of another family and
another tokenizer than the quickstart's GPT2 teacher, as ``examples/cross-tokenizer.yaml``
expects. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import read_jsonl
from .tokenizer_build import build_tokenizer


@dataclass
class StudentConfig:
    vocab_size: int = 1024
    layers: int = 2
    width: int = 64
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 256
    seed: int = 0


def build_student(train_jsonl: Path, out_dir: Path, cfg: StudentConfig, text_field: str = "text") -> Path:
    """Tokenizer learned from ``train_jsonl``'s texts, and a fresh model of its vocabulary, in ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = read_jsonl(train_jsonl, text_field=text_field, label_field=None, label_to_id=None, max_bad_fraction=0.0)
    tokenizer = build_tokenizer([r.text for r in rows], cfg.vocab_size, out_dir)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.width,
            intermediate_size=2 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=int(tokenizer.pad_token_id),
        )
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdistill.trainer.student_build", description=__doc__)
    p.add_argument("--pvc", type=Path, default=Path("pvc"), help="local stand-in for the volumes (./pvc)")
    p.add_argument("--train", default="data/pydoc-train.jsonl", help="texts to learn the tokenizer from, under --pvc")
    p.add_argument("--out", default="models/other-tokenizer-student", help="model folder to write, under --pvc")
    p.add_argument("--vocab-size", type=int, default=StudentConfig.vocab_size)
    p.add_argument("--layers", type=int, default=StudentConfig.layers)
    p.add_argument("--width", type=int, default=StudentConfig.width)
    args = p.parse_args(argv)
    train = args.pvc / args.train
    if not train.is_file():
        print(
            f"{train} does not exist: build the corpus first (python -P -m kdistill.trainer.teacher_pretrain)",
            file=sys.stderr,
        )
        return 1
    cfg = StudentConfig(vocab_size=args.vocab_size, layers=args.layers, width=args.width)
    out = build_student(train, args.pvc / args.out, cfg)
    print(json.dumps({"event": "student-ready", "path": str(out), **asdict(cfg)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
