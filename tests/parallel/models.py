"""Tiny decoders built from configs (nothing downloaded), identical in every process for a seed."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def tiny_model(family: str, *, layers: int = 8, seed: int = 0, num_labels: int = 0) -> nn.Module:
    """A causal LM, or with ``num_labels`` a ``*ForSequenceClassification`` (pad id 0)."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            num_labels=max(num_labels, 2),
        )
        return GPT2ForSequenceClassification(cfg) if num_labels else GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            num_labels=max(num_labels, 2),
        )
        return LlamaForSequenceClassification(cfg) if num_labels else LlamaForCausalLM(cfg)
    raise ValueError(family)


def batch(seed: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a right-padded attention mask (some rows shorter), like collate builds."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        keep = length - (r % 3)
        mask[r, keep:] = 0
        ids[r, keep:] = 0
    return ids, mask
