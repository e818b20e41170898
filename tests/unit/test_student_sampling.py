"""The student's sampler: KV-cached decoding of left-padded prompts equals decoding each prompt
alone without a cache, draws follow softmax(logits / T), rows stop at eos or their limit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kdistill.trainer.student_sampling import sample_completions

VOCAB = 29
EOS = 1


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2, initializer_range=0.5)
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(cfg)


def _greedy_without_cache(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS:
                break
    return ids[len(prompt) :]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_left_padded_decoding_equals_each_prompt_alone(kind: str) -> None:
    model = _model(kind).train()
    prompts = [[5, 9, 2, 7, 7], [11, 3], [4, 20, 8]]
    # A tiny temperature makes each draw the argmax: the sequences must then be the same tokens.
    got = sample_completions(model, prompts, max_new_tokens=8, temperature=1e-6, eos_id=EOS, pad_id=0)
    want = [_greedy_without_cache(model.eval(), p, 8) for p in prompts]
    assert got == want
    assert model.training is False  # eval() above; the sampler restores the mode it found
    model.train()
    sample_completions(model, prompts, max_new_tokens=2, temperature=1.0, eos_id=EOS, pad_id=0)
    assert model.training


def test_draws_follow_the_tempered_distribution() -> None:
    model = _model("gpt2")
    prompt = [5, 9, 2]
    temperature = 0.7
    with torch.no_grad():
        probs = torch.softmax(model.eval()(torch.tensor([prompt])).logits[0, -1] / temperature, dim=-1)
    n = 4000
    g = torch.Generator().manual_seed(1)
    draws = sample_completions(
        model, [prompt] * n, max_new_tokens=1, temperature=temperature, eos_id=None, pad_id=0, generator=g
    )
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=VOCAB).double()
    # Every frequency within 5 standard errors of its probability (a wrong temperature or a
    # truncated distribution is off by far more than that on these peaked rows).
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert bool(((counts / n - probs.double()).abs() <= 5 * se + 1e-3).all())
    assert float(probs.max()) > 0.2  # the check is not against a flat distribution


def test_rows_stop_at_eos_or_their_own_limit() -> None:
    model = _model("gpt2")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 0.0
    # A flat distribution: each draw is EOS with probability 1/VOCAB.
    g = torch.Generator().manual_seed(2)
    out = sample_completions(
        model, [[3, 4]] * 200, max_new_tokens=12, temperature=1.0, eos_id=EOS, pad_id=0, generator=g
    )
    assert all(1 <= len(c) <= 12 for c in out)
    assert all(EOS not in c[:-1] for c in out)  # nothing after the first eos
    ended = [c for c in out if c[-1] == EOS]
    assert ended and len(ended) < len(out)
    limited = sample_completions(
        model, [[3], [4, 5], [6]], max_new_tokens=[0, 3, 1], temperature=1.0, eos_id=None, pad_id=0
    )
    assert [len(c) for c in limited] == [0, 3, 1]


def test_bad_arguments_are_refused() -> None:
    model = _model("gpt2")
    with pytest.raises(ValueError, match="at least one token"):
        sample_completions(model, [[]], max_new_tokens=2, temperature=1.0, eos_id=EOS, pad_id=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, [[2]], max_new_tokens=2, temperature=0.0, eos_id=EOS, pad_id=0)
    with pytest.raises(ValueError, match="one per prompt"):
        sample_completions(model, [[2]], max_new_tokens=[1, 2], temperature=1.0, eos_id=EOS, pad_id=0)
