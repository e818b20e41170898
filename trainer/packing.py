"""Sequence packing: several examples in one row, with no attention across them.

A micro-batch of causal-lm examples is laid into rows of ``max_len`` tokens by first-fit
decreasing; padding is left only at the end of a row. Each example's position ids restart at 0,
which is how transformers' masking (``masking_utils.find_packed_sequence_indices``) recognises
packed rows when the model is called with ``position_ids`` and no ``attention_mask``: it builds a
block-diagonal causal mask, so a token attends only to earlier tokens of its own example, and
learned or rotary positions are those of the example alone. The trailing padding restarts its
positions too and forms a segment of its own that nothing else sees.

Labels are -100 on padding and on the first token of every example, so the row before it (the
previous example's last token) is not trained to predict across the boundary: the trained rows
are exactly those of the examples run one by one (``len - 1`` per example).

``pack_index`` maps every packed position to its place in the per-example layout [B, Lmax]
(``b * Lmax + t``, -1 on padding); ``to_packed`` and ``to_examples`` move per-token tensors (the
teacher cache's top-k) between the two layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import TokenizedExample

IGNORE_INDEX = -100


# A micro-batch whose examples, one a row padded to the longest, leave at most this share of the
# slots as padding is laid out one a row (``pack_or_pad``): the model then runs plain causal
# attention, whose fused kernel costs less than the few percent of tokens that packing would save
# with a block-diagonal mask (docs/benchmarks/trainer.md). Length-grouped batches mostly qualify.
MAX_PADDING_ONE_A_ROW = 0.10


def plan_rows(lengths: Sequence[int], max_len: int, one_a_row: bool = False) -> list[tuple[int, int]]:
    """(row, start) of each example: first-fit decreasing into rows of ``max_len`` tokens, or
    each example at the start of its own row (``one_a_row``)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if any(n < 1 or n > max_len for n in lengths):
        raise ValueError(f"every example needs 1..{max_len} tokens, got lengths {sorted(set(lengths))[:5]}...")
    if one_a_row:
        return [(i, 0) for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []  # tokens left in each row
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        n = lengths[i]
        row = next((r for r, left in enumerate(free) if left >= n), None)
        if row is None:
            row = len(free)
            free.append(max_len)
        place[i] = (row, max_len - free[row])
        free[row] -= n
    return place


def pack_or_pad(
    batch: Sequence[TokenizedExample], pad_id: int, task: str = "causal-lm", *, max_len: int
) -> dict[str, torch.Tensor]:
    """``pack_examples`` into rows of ``max_len``, or one example a row in rows as wide as the
    longest where that leaves at most ``MAX_PADDING_ONE_A_ROW`` of padding; the same fields."""
    if not batch:
        raise ValueError("pack_or_pad: empty batch")
    lengths = [len(ex.input_ids) for ex in batch]
    longest = max(lengths)
    if 1 - sum(lengths) / (len(lengths) * longest) <= MAX_PADDING_ONE_A_ROW:
        return pack_examples(batch, pad_id, task, max_len=longest, one_a_row=True)
    return pack_examples(batch, pad_id, task, max_len=max_len)


def pack_examples(
    batch: Sequence[TokenizedExample],
    pad_id: int,
    task: str = "causal-lm",
    *,
    max_len: int,
    one_a_row: bool = False,
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids``, ``attention_mask`` (1 on real tokens: what the loop
    counts; the model is called without it), ``labels`` [R, max_len]; ``example_ids`` and
    ``lengths`` [B]; ``pack_index`` [R, max_len]. ``one_a_row``: each example alone in its row."""
    if task != "causal-lm":
        raise ValueError(f"packing is for causal-lm batches, not {task!r}")
    if not batch:
        raise ValueError("pack_examples: empty batch")
    lengths = [len(ex.input_ids) for ex in batch]
    place = plan_rows(lengths, max_len, one_a_row)
    rows = 1 + max(r for r, _ in place)
    longest = max(lengths)
    input_ids = torch.full((rows, max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, max_len), dtype=torch.long)
    # Padding restarts its positions: a segment of its own for the packed-sequence mask.
    position_ids = torch.arange(max_len, dtype=torch.long).repeat(rows, 1)
    pack_index = torch.full((rows, max_len), -1, dtype=torch.long)
    for b, (ex, (row, start)) in enumerate(zip(batch, place, strict=True)):
        n = lengths[b]
        input_ids[row, start : start + n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, start : start + n] = 1
        position_ids[row, start : start + n] = torch.arange(n)
        pack_index[row, start : start + n] = b * longest + torch.arange(n)
    for row in range(rows):
        used = int(mask[row].sum())
        position_ids[row, used:] = torch.arange(max_len - used)
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)  # first tokens: never a target
    example_ids = torch.tensor([ex.index for ex in batch], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "labels": labels,
        "example_ids": example_ids,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "pack_index": pack_index,
    }


def to_packed(per_example: torch.Tensor, pack_index: torch.Tensor) -> torch.Tensor:
    """[B, Lmax, ...] laid out as the packed rows [R, L, ...]; zeros on padding."""
    flat = per_example.reshape(-1, *per_example.shape[2:])
    real = pack_index >= 0
    out = flat.new_zeros((*pack_index.shape, *per_example.shape[2:]))
    out[real] = flat[pack_index[real]]
    return out


def to_examples(packed: torch.Tensor, pack_index: torch.Tensor, batch_size: int, longest: int) -> torch.Tensor:
    """Packed rows [R, L, ...] laid out per example [B, longest, ...]; zeros past each example."""
    real = pack_index >= 0
    out = packed.new_zeros((batch_size * longest, *packed.shape[2:]))
    out[pack_index[real]] = packed[real]
    return out.reshape(batch_size, longest, *packed.shape[2:])
