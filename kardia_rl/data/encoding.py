"""Prompt and target token ids of a turn sample, and the train/validation turns of the configured data.

One encoder for every room that shows the policy a prompt (SFT, GRPO rollouts, the split's rater, eval, chat):
the prompt is built exactly as for GRPO rollouts (kardia_rl.format.build_messages + build_prompt with the
cfg.data options), so every stage sees the context the policy was trained in. Prompt and target are
tokenised separately and concatenated by the caller, which makes the label boundary exact (no offset mapping)
and matches what the sampler continues from (the template's generation prompt `<|im_start|>assistant\\n`).

Long prompts lose their oldest history turns first (cfg.model.max_prompt_tokens, or a smaller budget the
caller gives); when a single turn is still too long, the start of that user turn is cut (never the chat header
or the system prompt).
"""
from __future__ import annotations

from typing import Any, Optional

from kardia_rl.data.emotions import label_set
from kardia_rl.data.schema import TurnSample, expand_turns
from kardia_rl.data.splits import split_dialogues
from kardia_rl.data.validate import load_dialogues
from kardia_rl.errors import KardiaError
from kardia_rl.format.prompt import DEFAULT_SYSTEM_TEMPLATE, build_messages, build_prompt, fit_last_turn


def load_training_turns(cfg) -> tuple[list[TurnSample], list[TurnSample]]:
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


def prompt_messages(sample: TurnSample, cfg, max_history_turns: int) -> list[dict]:
    """The chat messages of `sample` under the cfg.data prompt options, with at most `max_history_turns`."""
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
        messages = prompt_messages(sample, cfg, turns)
        ids = tokenizer(build_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return ids
        if turns <= 1:  # one turn left and still too long: cut its start, never the header or system prompt
            return fit_last_turn(tokenizer, messages, budget)
        turns -= 1


def encode_target(sample: TurnSample, tokenizer: Any) -> list[int]:
    """The reference answer's token ids plus EOS (what SFT teaches and the weight-sync probe scores)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KardiaError("the tokenizer has no eos_token; SFT needs it to teach the model where to stop")
    return tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [eos]
