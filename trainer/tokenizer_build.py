"""Build a real byte-level BPE tokenizer locally from text, without any hub download.

Tests and the quickstart need a tokenizer whose vocabulary is learned from real text (Python's
own documentation in ``pydoc_data``), saved like any Hugging Face tokenizer so that
``AutoTokenizer.from_pretrained(out_dir)`` reloads it. Byte-level BPE covers every input
(no unknown characters), which keeps causal-lm perplexities honest; ``<unk>`` exists only
because some model configs expect the id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"
# Fixed order, so the special ids are the same for every vocabulary: pad=0, bos=1, eos=2, unk=3, mask=4.
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, MASK]
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the byte alphabet must fit


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path, *, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``, save it to ``out_dir`` and return it reloaded from there.

    Returning the reloaded copy proves the saved files are complete: whatever a later process loads
    from ``out_dir`` is exactly what the caller got.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (specials + 256 bytes), got {vocab_size}")
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("build_tokenizer needs non-empty training texts")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        model_max_length=model_max_length,
        padding_side="right",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise TypeError(f"reloaded tokenizer is {type(loaded).__name__}, expected a fast tokenizer")
    return loaded
