"""Token-id batches for the learner: rollout batches (prompt + response, GRPO) and SFT batches (labels).

Rollout layout (the one every learner function assumes)::

    input_ids      [B, P + T]   prompt LEFT-padded to P, response RIGHT-padded to T
    attention_mask [B, P + T]   1 on real tokens
    position_ids   [B, P + T]   0, 1, 2, ... from each row's first real token (left padding must not shift
                                positions, or the learner's logprobs differ from the engine's)
    response_mask  [B, T]       1 on real response tokens (EOS included when it was generated)
    old_logprobs / ref_logprobs / engine_logprobs  [B, T]   optional, 0 at padding
    advantages [B], keep [B] (bool)                          optional

Every response starts at column P, so "logits of the last T+1 positions" gives exactly the response
logprobs, and the LM head never runs on prompt positions (the memory-heavy [.., V] tensor stays [B, T, V]).

Micro-batches are cut by rows (at most `micro_batch_size`, optionally also a token budget so one long
batch cannot run out of memory) and trimmed of the padding their rows do not need.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from kardia_rl.utils.seeds import split_even

IGNORE_INDEX = -100
PER_TOKEN_KEYS = ("response_mask", "old_logprobs", "ref_logprobs", "engine_logprobs")
SEQ_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")
ROW_KEYS = ("advantages", "keep")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (padding gets 0; it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad_rows(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out


def collate_rollout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, *,
                    old_logprobs: Optional[Sequence[Sequence[float]]] = None,
                    ref_logprobs: Optional[Sequence[Sequence[float]]] = None,
                    engine_logprobs: Optional[Sequence[Sequence[float]]] = None,
                    advantages: Optional[Sequence[float] | torch.Tensor] = None,
                    keep: Optional[Sequence[bool] | torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Pad token-id lists into the rollout layout above. Per-token float lists must match response lengths."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"need the same, nonzero number of prompts and responses; got {len(prompt_ids)} and "
                         f"{len(response_ids)}")
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(max(len(r) for r in response_ids), 1)
    if min(len(p) for p in prompt_ids) == 0:
        raise ValueError("every prompt needs at least one token (the response is predicted from it)")
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    resp_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if len(r):
            input_ids[i, P:P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            resp_mask[i, :len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids_from_mask(attn),
             "response_mask": resp_mask}
    for name, rows in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                       ("engine_logprobs", engine_logprobs)):
        if rows is None:
            continue
        if len(rows) != B or any(len(x) != len(r) for x, r in zip(rows, response_ids)):
            raise ValueError(f"{name}: need one value per response token for each of the {B} responses")
        batch[name] = _pad_rows(rows, T, torch.float32)
    if advantages is not None:
        batch["advantages"] = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if batch["advantages"].numel() != B:
            raise ValueError(f"advantages: expected {B} values, got {batch['advantages'].numel()}")
    if keep is not None:
        batch["keep"] = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    return batch


def batch_size_of(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def select_rows(batch: dict, idx: Sequence[int] | torch.Tensor) -> dict:
    """Rows `idx` of every tensor in `batch` (non-tensor values are copied as they are)."""
    ix = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
    return {k: (v.index_select(0, ix.to(v.device)) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def shard_rows(batch: dict, rank: int, world_size: int) -> dict:
    """Contiguous share of rows for data-parallel `rank` (sizes differ by at most one)."""
    n = batch_size_of(batch)
    lo, hi = split_even(n, world_size)[rank]
    return select_rows(batch, range(lo, hi))


def trim_rollout(batch: dict) -> dict:
    """Drop the left prompt padding and right response padding that no row in `batch` needs.

    The response keeps starting at column P' = (new prompt width), so the layout stays valid.
    """
    am, rm = batch["attention_mask"], batch["response_mask"]
    T = rm.shape[1]
    P = am.shape[1] - T
    prompt_len = am[:, :P].sum(-1)
    new_p = max(int(prompt_len.max()), 1)
    new_t = max(int(rm.sum(-1).max()), 1)
    out = {}
    for k, v in batch.items():
        if k in SEQ_KEYS and isinstance(v, torch.Tensor):
            out[k] = v[:, P - new_p:P + new_t]
        elif k in PER_TOKEN_KEYS and isinstance(v, torch.Tensor):
            out[k] = v[:, :new_t]
        else:
            out[k] = v
    return out


def row_token_counts(batch: dict) -> list[int]:
    return [int(x) for x in batch["attention_mask"].sum(-1)]


def chunk_rows(lengths: Sequence[int], max_rows: int, max_tokens: int = 0, sort: bool = True) -> list[list[int]]:
    """Split row indices into micro-batches of at most `max_rows` rows and (when `max_tokens > 0`) at most
    `max_tokens` padded tokens (rows x longest row). Rows are sorted by length first so neighbours pad
    little; a single row longer than the budget still gets its own micro-batch.
    """
    if max_rows < 1:
        raise ValueError(f"micro batch size must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    chunks: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and (len(cur) >= max_rows or (max_tokens > 0 and m * (len(cur) + 1) > max_tokens)):
            chunks.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        chunks.append(cur)
    return chunks


def rollout_micro_batches(batch: dict, micro_batch_size: int, max_tokens: int = 0) -> list[dict]:
    """Trimmed micro-batches of a rollout batch (see `chunk_rows`)."""
    chunks = chunk_rows(row_token_counts(batch), micro_batch_size, max_tokens)
    return [trim_rollout(select_rows(batch, c)) | {"_rows": torch.as_tensor(c, dtype=torch.long)} for c in chunks]


# --- SFT ------------------------------------------------------------------------------------------------
def collate_sft(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                position_ids: Optional[Sequence[Sequence[int]]] = None) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs; labels are IGNORE_INDEX on prompt and padding positions.

    `position_ids` (packing) restart at every packed sample; without it positions are 0..len-1.
    """
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    L = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: {len(ids)} input ids but {len(lab)} labels")
        n = len(ids)
        input_ids[i, :n] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(lab), dtype=torch.long)
        attn[i, :n] = 1
        pos[i, :n] = torch.as_tensor(list(position_ids[i]), dtype=torch.long) if position_ids else torch.arange(n)
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos, "labels": labels}


def sft_micro_batches(batch: dict, micro_batch_size: int, max_tokens: int = 0) -> list[dict]:
    """Row micro-batches of an SFT batch, each trimmed of right padding."""
    lengths = row_token_counts(batch)
    out = []
    for c in chunk_rows(lengths, micro_batch_size, max_tokens):
        mb = select_rows(batch, c)
        width = max(lengths[i] for i in c)
        out.append({k: (v[:, :width] if k in SEQ_KEYS else v) for k, v in mb.items()})
    return out


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_len: int
                  ) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """Greedy first-fit packing of examples (in the given order) into sequences of at most `max_seq_len`.

    Returns (packed (ids, labels) pairs, their position_ids restarting at 0 for each sample). The first
    label of each sample is already IGNORE_INDEX (a prompt token), so no loss crosses a boundary; whether
    attention crosses it depends on the kernel (see sft.py).
    """
    packs: list[tuple[list[int], list[int], list[int]]] = []
    for ids, lab in examples:
        ids, lab = list(ids)[:max_seq_len], list(lab)[:max_seq_len]
        for p in packs:
            if len(p[0]) + len(ids) <= max_seq_len:
                p[0].extend(ids)
                p[1].extend(lab)
                p[2].extend(range(len(ids)))
                break
        else:
            packs.append((ids, lab, list(range(len(ids)))))
    return [(p[0], p[1]) for p in packs], [p[2] for p in packs]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 16) -> list[list[int]]:
    """Shuffled batches of similar-length examples (HF `group_by_length`): shuffle, cut into mega-batches of
    `mega * batch_size`, sort each by length, cut into batches, shuffle the batches. Less padding per step
    while the order stays random from epoch to epoch (vary `seed`).
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches: list[list[int]] = []
    step = max(batch_size * mega, batch_size)
    for s in range(0, len(idx), step):
        group = sorted(idx[s:s + step], key=lambda i: -lengths[i])
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches
