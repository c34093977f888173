"""SFT examples: chat-template prompt + the reference four-span answer + EOS, loss on the answer only.

The prompt is built exactly as for GRPO rollouts (kardia_rl.format.build_messages + build_prompt with the
cfg.data options), so SFT teaches the format in the context the policy will later see. Prompt and target
are tokenised separately and concatenated, which makes the label boundary exact (no offset mapping) and
matches what the sampler continues from (the template's generation prompt `<|im_start|>assistant\\n`).

Long prompts lose their oldest history turns first (cfg.model.max_prompt_tokens, and the room left by
cfg.sft.max_seq_len after the target); when a single turn is still too long, the start of that user turn is cut
(never the chat header or the system prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kardia_rl.data import TurnSample, expand_turns, label_set, load_dialogues, split_dialogues
from kardia_rl.errors import KardiaError
from kardia_rl.format.prompt import DEFAULT_SYSTEM_TEMPLATE, build_messages, build_prompt, fit_last_turn, header_tokens
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


def load_sft_samples(cfg) -> tuple[list[TurnSample], list[TurnSample]]:
    """(train, validation) per-turn samples of cfg.data.path, split by dialogue before expansion."""
    labels = label_set(cfg.data.emotion_labels or None)
    dialogues = load_dialogues(cfg.data.path, labels, cfg.data.span_notation, cfg.data.hf_split)
    test_fraction = 0.0 if cfg.data.test_path else cfg.data.test_fraction
    parts = split_dialogues(dialogues, cfg.data.val_fraction, test_fraction, cfg.data.split_seed,
                            cfg.data.split_by)
    train = [s for d in parts["train"] for s in expand_turns(d)]
    val = [s for d in parts["validation"] for s in expand_turns(d)]
    if not train:
        raise KardiaError(f"data.path {cfg.data.path!r}: no training turns left after the validation split "
                          f"(data.val_fraction={cfg.data.val_fraction})")
    return train, val


def _messages(sample: TurnSample, cfg, max_history_turns: int) -> list[dict]:
    return build_messages(
        sample.person, sample.situation, sample.history,
        system=sample.system if cfg.data.use_record_system else None,
        template=cfg.data.system_template or DEFAULT_SYSTEM_TEMPLATE, history_mode=cfg.data.history,
        notation=cfg.data.span_notation, max_history_turns=max_history_turns)


def encode_prompt(sample: TurnSample, tokenizer: Any, cfg, max_tokens: Optional[int] = None) -> list[int]:
    """Prompt token ids of `sample` within `max_tokens` (default cfg.model.max_prompt_tokens)."""
    budget = cfg.model.max_prompt_tokens if max_tokens is None else min(max_tokens, cfg.model.max_prompt_tokens)
    if budget < 1:
        raise KardiaError(f"no room for the prompt (budget {budget} tokens): raise sft.max_seq_len or "
                          f"model.max_prompt_tokens")
    n_user = sum(1 for m in sample.history if m["role"] == "user")
    turns = cfg.data.max_history_turns if cfg.data.max_history_turns > 0 else n_user
    turns = min(turns, n_user)
    while True:
        messages = _messages(sample, cfg, turns)
        ids = tokenizer(build_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return ids
        if turns <= 1:  # one turn left and still too long: cut its start, never the header or system prompt
            return fit_last_turn(tokenizer, messages, budget)
        turns -= 1


def encode_target(sample: TurnSample, tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KardiaError("the tokenizer has no eos_token; SFT needs it to teach the model where to stop")
    return tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [eos]


def build_examples(samples: Sequence[TurnSample], tokenizer: Any, cfg) -> tuple[list[SFTExample], int, int]:
    """Examples within cfg.sft.max_seq_len; also how many targets were cut (they lose their end) and how many
    prompts are shorter than at inference (cut to make room: the model then trains on a context it will
    not see at generation time, so raise sft.max_seq_len when this count is large)."""
    max_len = cfg.sft.max_seq_len
    out, targets_cut, prompts_cut = [], 0, 0
    for s in samples:
        target = encode_target(s, tokenizer)
        floor = header_tokens(tokenizer, _messages(s, cfg, 1))
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
