"""`kardia-rl chat [CONFIG] --model DIR`: a persona chat with a trained policy, prompted exactly as in training.

The persona comes from `--profile FILE` (a KardiaBench record, as .json or the first line of a .jsonl, or any
JSON object with `person` and `situation`) or from `--persona TEXT --situation TEXT`. Each user turn goes
through the same prompt encoder as SFT, GRPO and eval (kardia_rl.data.encoding.encode_prompt: system
prompt, the model's chat template, history cut to data.max_history_turns and model.max_prompt_tokens), and the
answer is parsed with the strict four-span parser: the response span is shown, `--show-spans` shows all four,
and a malformed answer is shown raw with a note (never an error). User turns come from `--input FILE` (one per
line), from piped stdin, or interactively. Decoding follows eval.* (greedy or sampled at eval.temperature).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator, Optional, TextIO

from kardia_rl.errors import KardiaError


def load_profile(path: str) -> dict:
    """person, situation (and the record's system prompt, if any) from a KardiaBench record or a JSON object."""
    if not os.path.isfile(path):
        raise KardiaError(f"--profile {path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        rec = json.loads(text.splitlines()[0] if path.endswith(".jsonl") else text) if text else None
    except json.JSONDecodeError as e:
        raise KardiaError(f"--profile {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(rec, list) and rec:
        rec = rec[0]
    if not isinstance(rec, dict) or not rec.get("person") or not rec.get("situation"):
        raise KardiaError(f"--profile {path}: needs a JSON object with non-empty 'person' and 'situation'")
    system = next((m["content"] for m in rec.get("messages") or [] if m.get("role") == "system"), None)
    return {"person": str(rec["person"]), "situation": str(rec["situation"]), "system": system}


def user_turns(input_file: Optional[str], stdin: TextIO) -> Iterator[str]:
    """Non-empty lines of --input FILE, else of piped stdin, else interactive input (until EOF or /quit)."""
    if input_file:
        if not os.path.isfile(input_file):
            raise KardiaError(f"--input {input_file}: file not found")
        with open(input_file, encoding="utf-8") as f:
            lines: Iterable[str] = f.read().splitlines()
    elif not stdin.isatty():
        lines = stdin.read().splitlines()
    else:
        def interactive():
            while True:
                try:
                    yield input("you> ")
                except EOFError:
                    return
        lines = interactive()
    for line in lines:
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip():
            yield line.strip()


class ChatSession:
    """One persona conversation: `reply(user_text)` returns the answer and keeps the history."""

    def __init__(self, cfg, engine, profile: dict):
        self.cfg, self.engine, self.profile = cfg, engine, profile
        self.history: list[dict] = []
        self.turn = 0

    def _sample(self):
        from kardia_rl.data import TurnSample

        return TurnSample(id=f"chat-{self.turn}", dialogue_id="chat", turn=self.turn, person=self.profile["person"],
                          mbti="", emotion="", situation=self.profile["situation"], anon_username="user",
                          system=self.profile.get("system"), history=list(self.history), target="")

    def reply(self, user_text: str) -> dict:
        from kardia_rl.format.prompt import crop_history
        from kardia_rl.format.spans import parse_spans
        from kardia_rl.data.encoding import encode_prompt

        cfg = self.cfg
        self.history.append({"role": "user", "content": user_text})
        # the stored history keeps only what the prompt can use (data.max_history_turns user turns)
        self.history = crop_history(self.history, cfg.data.max_history_turns)
        prompt = encode_prompt(self._sample(), self.engine.tokenizer, cfg)
        out = self.engine.generate([prompt], 1, temperature=cfg.eval.temperature, top_p=cfg.rollout.top_p,
                                   max_new_tokens=cfg.model.max_new_tokens, seed=cfg.seed + self.turn,
                                   greedy=cfg.eval.greedy)[0][0]
        self.turn += 1
        parsed = parse_spans(out.text, cfg.data.span_notation)
        self.history.append({"role": "assistant", "content": out.text})
        note = None
        if not parsed.ok:
            note = f"malformed answer ({parsed.reason})" + (" - cut at max_new_tokens" if out.finish_reason == "length" else "")
        return {"text": out.text, "ok": parsed.ok, "spans": parsed.spans.as_dict() if parsed.ok else dict(parsed.found),
                "response": parsed.spans.response if parsed.ok else parsed.found.get("response"), "note": note,
                "prompt_tokens": len(prompt), "answer_tokens": len(out.token_ids)}


def render(result: dict, show_spans: bool) -> str:
    if result["ok"] and not show_spans:
        return f"assistant> {result['response'].strip()}"
    lines = []
    if result["ok"]:
        lines += [f"  [{name}] {text.strip()}" for name, text in result["spans"].items()]
        return "assistant>\n" + "\n".join(lines)
    lines.append(f"assistant (note: {result['note']}; shown raw)> {result['text'].strip()}")
    return "\n".join(lines)


def cmd_chat(args) -> int:
    from kardia_rl.config.cli import config_from_args
    from kardia_rl.engines import engine_from_config
    from kardia_rl.model.prepare import resolve_source

    cfg = config_from_args(args)
    if args.profile and (args.persona or args.situation):
        raise KardiaError("give either --profile FILE or --persona TEXT --situation TEXT, not both")
    if args.profile:
        profile = load_profile(args.profile)
    elif args.persona and args.situation:
        profile = {"person": args.persona, "situation": args.situation, "system": None}
    else:
        raise KardiaError("chat needs a persona: --profile FILE, or --persona TEXT and --situation TEXT")
    if not cfg.data.use_record_system:
        profile["system"] = None
    src = resolve_source(args.model, "--model")
    if src.kind == "gguf":
        raise KardiaError(f"--model {args.model}: a .gguf file must be prepared first: "
                          f"kardia-rl prepare --model {args.model} --out DIR, then --model DIR")
    engine = engine_from_config(cfg, src.local, kind=args.engine, verify_reference=False)
    session = ChatSession(cfg, engine, profile)
    try:
        for text in user_turns(args.input, sys.stdin):
            if args.input or not sys.stdin.isatty():
                print(f"you> {text}")
            print(render(session.reply(text), args.show_spans), flush=True)
    finally:
        engine.shutdown()
    return 0


def configure_chat(p) -> None:
    from kardia_rl.config.cli import add_config_args

    add_config_args(p, "YAML config (prompt, history and decoding settings)", "eval.greedy=false")
    p.add_argument("--model", required=True, help="trained policy folder (or a prepared hub id)")
    p.add_argument("--profile", default=None, help="KardiaBench record (.json/.jsonl) or JSON with person/situation")
    p.add_argument("--persona", default=None, help="the user's profile, as free text")
    p.add_argument("--situation", default=None, help="the user's situation, as free text")
    p.add_argument("--show-spans", action="store_true", help="show all four spans, not only the response")
    p.add_argument("--input", default=None, help="file with one user turn per line (else stdin or interactive)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="generation engine (default hf: fast start)")


cmd_chat.configure = configure_chat
