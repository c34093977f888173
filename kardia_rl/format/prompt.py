"""Prompt construction: system prompt with the user's profile, then the dialogue history, rendered through
the tokenizer's own chat template (so the same code serves the tiny local model and Qwen2.5/Gemma).

Past assistant turns are shown as what the user saw (the response span) by default: the four-span
reasoning of earlier turns is private to the model, costs prompt tokens, and the paper's data shows only
replies to the user simulator. `history="full"` keeps whole four-span turns instead.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from kardia_rl.config.schema import HISTORY_MODES
from kardia_rl.format.spans import parse_spans

DEFAULT_SYSTEM_TEMPLATE = (
    "You are a warm, supportive listener in the style of a therapist. Read the user's profile and the "
    "situation, understand what they feel and why, then answer in four parts: "
    "<|understanding_begin|>what the user means and feels<|understanding_end|>"
    "<|reasoning_begin|>why they feel so and what would help<|reasoning_end|>"
    "<|emotion_begin|>one emotion label<|emotion_end|>"
    "<|response_begin|>a short, kind reply to the user<|response_end|>\n"
    "User profile:\n{person}\nSituation: {situation}"
)


def build_system_prompt(person: str, situation: str, template: str = DEFAULT_SYSTEM_TEMPLATE) -> str:
    return template.format(person=person.strip(), situation=situation.strip())


def visible_history(messages: Sequence[dict], history: str = "response", notation: str = "kardia") -> list[dict]:
    """Copy of `messages` where assistant turns are reduced to their response span (`history="response"`).

    A malformed past assistant turn (no response span) is kept verbatim rather than dropped, so the
    model still sees that something was said.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
    out = []
    for m in messages:
        content = m["content"]
        if history == "response" and m["role"] == "assistant":
            content = parse_spans(content, notation).found.get("response") or content
        out.append({"role": m["role"], "content": content})
    return out


def crop_history(turns: Sequence[dict], max_user_turns: int) -> list[dict]:
    """The last `max_user_turns` user turns of `turns` and every turn after the first of them (0 = all):
    data.max_history_turns, the one rule for the policy's prompt, the judge's view and the chat's memory."""
    turns = list(turns)
    if max_user_turns > 0:
        user_idx = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(user_idx) > max_user_turns:
            turns = turns[user_idx[-max_user_turns]:]
    return turns


def build_messages(person: str, situation: str, history: Sequence[dict], *, system: Optional[str] = None,
                   template: str = DEFAULT_SYSTEM_TEMPLATE, history_mode: str = "response",
                   notation: str = "kardia", max_history_turns: int = 0) -> list[dict]:
    """Chat messages for one prompt: the system prompt (the record's own, else built from `template`)
    followed by the history (which ends with the user turn to answer).

    `max_history_turns > 0` keeps only the last that many user turns (and the replies between them), which
    bounds prompt length on long dialogues.
    """
    turns = crop_history([m for m in history if m["role"] != "system"], max_history_turns)
    sys_text = system if system else build_system_prompt(person, situation, template)
    return [{"role": "system", "content": sys_text}] + visible_history(turns, history_mode, notation)


def build_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """Render `messages` with the tokenizer's chat template, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; build the model with `kardia-rl init-model` or use "
                         "an instruct model whose tokenizer ships one")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError (raise_exception): some templates (Gemma) reject a system turn
        if not (messages and messages[0]["role"] == "system" and "system" in str(e).lower()):
            raise
    return tokenizer.apply_chat_template(fold_system(messages), tokenize=False, add_generation_prompt=True)


def fold_system(messages: Sequence[dict]) -> list[dict]:
    """The system prompt moved to the start of the first user turn, for chat templates without a system role
    (what Gemma's own template does with a system message when it accepts one)."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}] + rest


def header_tokens(tokenizer: Any, messages: Sequence[dict]) -> int:
    """Tokens of the prompt with the last message emptied: what no truncation may cut."""
    body = [dict(m) for m in messages]
    body[-1]["content"] = ""
    return len(tokenizer(build_prompt(tokenizer, body), add_special_tokens=False)["input_ids"])


def fit_last_turn(tokenizer: Any, messages: Sequence[dict], budget: int) -> list[int]:
    """Prompt token ids within `budget` when even one user turn is too long: the header, the system prompt and
    the generation prompt stay whole, and only the START of the last message is cut (its end is what the
    answer replies to). The cut is on characters (binary search), so it never splits a special token.
    """
    from kardia_rl.errors import KardiaError

    *head, last = [dict(m) for m in messages]
    text = last["content"]

    def ids(keep: int) -> list[int]:
        body = head + [{**last, "content": text[len(text) - keep:] if keep else ""}]
        return tokenizer(build_prompt(tokenizer, body), add_special_tokens=False)["input_ids"]

    empty = header_tokens(tokenizer, messages)
    if empty > budget:
        raise KardiaError(f"model.max_prompt_tokens={budget}: the system prompt and chat header alone take {empty} "
                          f"tokens; raise model.max_prompt_tokens or shorten data.system_template")
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= budget else (lo, mid - 1)
    return ids(lo)
