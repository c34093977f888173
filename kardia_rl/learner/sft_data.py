"""SFT examples: chat-template prompt + the reference four-span answer + EOS, loss on the answer only.

Prompt and target come from the shared encoder (kardia_rl.data.encoding), so SFT teaches the format in the
context the policy will later see in rollouts; here they are fitted into cfg.sft.max_seq_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kardia_rl.data import TurnSample
from kardia_rl.data.encoding import encode_prompt, encode_target, prompt_messages
from kardia_rl.errors import KardiaError
from kardia_rl.format.prompt import header_tokens
from kardia_rl.learner.batching import IGNORE_INDEX


@dataclass
class SFTExample:
    sample_id: str
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.target_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def build_examples(samples: Sequence[TurnSample], tokenizer: Any, cfg) -> tuple[list[SFTExample], int, int]:
    """Examples within cfg.sft.max_seq_len; also how many targets were cut (they lose their end) and how many
    prompts are shorter than at inference (cut to make room: the model then trains on a context it will
    not see at generation time, so raise sft.max_seq_len when this count is large)."""
    max_len = cfg.sft.max_seq_len
    out, targets_cut, prompts_cut = [], 0, 0
    for s in samples:
        target = encode_target(s, tokenizer)
        floor = header_tokens(tokenizer, prompt_messages(s, cfg, 1))
        if floor >= max_len:
            raise KardiaError(f"sft.max_seq_len={max_len}: the system prompt and chat header of sample {s.id} "
                              f"alone take {floor} tokens; raise sft.max_seq_len")
        # keep at least a quarter of the sequence for the prompt (an answer without its context teaches little),
        # and always the header and system prompt (never cut): the target gives way
        room_for_target = min(max_len - max(1, max_len // 4), max_len - floor)
        if len(target) > room_for_target:
            target, targets_cut = target[:room_for_target], targets_cut + 1
        prompt = encode_prompt(s, tokenizer, cfg, max_len - len(target))
        if len(prompt) + len(target) >= max_len and len(prompt) < len(encode_prompt(s, tokenizer, cfg)):
            prompts_cut += 1
        out.append(SFTExample(s.id, prompt, target))
    return out, targets_cut, prompts_cut
