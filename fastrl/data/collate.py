"""Padding, packing and batching. Labels are aligned with ``input_ids`` (not shifted) and are -100 where no
loss is taken; position ids restart at 0 for every sequence, so left padding and packing leave each
sequence's positions as if it stood alone."""

from __future__ import annotations

import torch

IGNORE = -100


def padded_length(n: int, multiple_of: int | None) -> int:
    if multiple_of:
        return -(-n // multiple_of) * multiple_of
    return n


def pad(
    seqs: list[list[int]], value: int, *, side: str = "right", multiple_of: int | None = None
) -> torch.Tensor:
    """[B, T] long tensor; T is the longest sequence rounded up to ``multiple_of``."""
    T = padded_length(max((len(s) for s in seqs), default=0), multiple_of)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, T - len(s) :] = torch.tensor(s)
    return out


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each real token within its own sequence (padding gets 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos))


def collate_lm(
    ids: list[list[int]], loss_masks: list[list[int]], pad_id: int, *, side: str, multiple_of: int | None
) -> dict:
    """One sequence per row: input_ids, attention_mask, position_ids, labels."""
    input_ids = pad(ids, pad_id, side=side, multiple_of=multiple_of)
    attention_mask = pad([[1] * len(s) for s in ids], 0, side=side, multiple_of=multiple_of)
    labels_list = [[t if m else IGNORE for t, m in zip(s, ms)] for s, ms in zip(ids, loss_masks)]
    labels = pad(labels_list, IGNORE, side=side, multiple_of=multiple_of)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions(attention_mask),
        "labels": labels,
    }


def collate_packed(
    packs: list[list[tuple[list[int], list[int]]]], pad_id: int, *, multiple_of: int | None
) -> dict:
    """Several sequences per row, concatenated; position ids restart at each sequence, which is how the
    attention implementation (Hugging Face detects packed rows from position ids when no attention mask is
    given) keeps sequences from attending to each other. Row padding forms a sequence of its own."""
    rows, row_labels, row_pos = [], [], []
    for pack in packs:
        ids, labels, pos = [], [], []
        for s, m in pack:
            ids += s
            labels += [t if f else IGNORE for t, f in zip(s, m)]
            pos += list(range(len(s)))
        rows.append(ids)
        row_labels.append(labels)
        row_pos.append(pos)
    input_ids = pad(rows, pad_id, multiple_of=multiple_of)
    T = input_ids.shape[1]
    position_ids = torch.stack([torch.tensor(p + list(range(T - len(p))), dtype=torch.long) for p in row_pos])
    return {
        "input_ids": input_ids,
        "attention_mask": None,
        "position_ids": position_ids,
        "labels": pad(row_labels, IGNORE, multiple_of=multiple_of),
    }


def collate_dpo(examples: list[dict], pad_id: int, *, side: str, multiple_of: int | None) -> dict:
    """2B rows, the B chosen sequences first and then the B rejected ones, padded to one length (chosen and
    rejected usually differ); labels cover the completion tokens only."""
    ids, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids.append(ex["prompt_ids"] + ex[key])
            masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
    return collate_lm(ids, masks, pad_id, side=side, multiple_of=multiple_of)


def collate_prompt_completion(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Rollout layout: prompts left-padded to P, completions right-padded to C, so every completion starts at
    column P. Returns input_ids/attention_mask/position_ids [B, P+C] and completion_ids/completion_mask
    [B, C]."""
    prompt_ids = pad(prompts, pad_id, side="left")
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left")
    completion_ids = pad(completions, pad_id)
    completion_mask = pad([[1] * len(c) for c in completions], 0)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": attention_mask,
        "position_ids": positions(attention_mask),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
