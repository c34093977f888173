"""`model.chat_template`: the chat template given to a model that ships none (base models, many fine-tunes), or
that replaces the model's own. A value is a known name (`chatml`) or a Jinja file; the model stage writes the
template into the prepared copy's tokenizer (kardia_rl.model.prepare), so every later stage uses it.

chatml renders `<|im_start|>role\ncontent<|im_end|>`; a model whose vocabulary lacks those markers reads them as
ordinary text, which is how TRL and OpenRLHF apply a template to a base model too. Generation stops at the span
format's `<|response_end|>` as well as at EOS, so the template need not change the model's EOS token.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from kardia_rl.errors import KardiaError


def chat_template_names() -> dict:
    """The templates `model.chat_template` accepts by name."""
    from kardia_rl.model.tiny import CHATML_TEMPLATE

    return {"chatml": CHATML_TEMPLATE}


def resolve_chat_template(value: str, key: str = "model.chat_template") -> str:
    """The template text of a known name or of a Jinja file; KardiaError (one line naming `key`) otherwise."""
    names = chat_template_names()
    if value in names:
        return names[value]
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise KardiaError(f"{key} {value!r}: not a known template ({' | '.join(names)}) and no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "messages" not in text:
        raise KardiaError(f"{key} {value!r}: not a chat template (a Jinja template over `messages`)")
    return text


def saved_chat_template(folder: str) -> Optional[str]:
    """The chat template a saved tokenizer folder carries (chat_template.jinja or tokenizer_config.json), or None;
    read from the files, no tokenizer load."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read() or None
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f).get("chat_template") or None
    return None


def no_template_error(given: str, key: str) -> KardiaError:
    return KardiaError(f"{key} {given!r}: the tokenizer has no chat template; set model.chat_template to a known "
                       f"template ({' | '.join(chat_template_names())}) or a .jinja file")
