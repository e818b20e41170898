"""Plain Hugging Face model directories (config.json, tokenizer files, model.safetensors; no
kdistill.json) of tiny models built from configs: what ``kdistill serve`` takes as a teacher."""

from __future__ import annotations

from pathlib import Path

from tests.serving.helpers import build_tiny_tokenizer, tiny_bert_classifier, tiny_gpt2


def save_hf_dir(root: Path, task: str = "causal-lm", *, seed: int = 3, safetensors: bool = True) -> Path:
    """``root/<task>``: an FP32 GPT2 (causal-lm) or BERT classifier with its tokenizer, saved by
    transformers' ``save_pretrained`` (only pickled weights, ``pytorch_model.bin``, when
    ``safetensors`` is False)."""
    tok_dir = root / "tokenizer"
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = build_tiny_tokenizer(tok_dir)
    model = (tiny_gpt2 if task == "causal-lm" else tiny_bert_classifier)(len(tokenizer), seed=seed)
    out = root / f"{task}{'' if safetensors else '-pickle'}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not safetensors:  # transformers 5 always writes safetensors: the pickled layout by hand
        import torch

        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out
