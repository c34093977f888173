"""KardiaBench data: schema, sources, validation, per-turn expansion, splits, emotion labels.

Light by design: importing this package never imports ray, vllm or deepspeed (a test asserts it).
"""
from kardia_rl.data.emotions import EMOTIONS_32, label_set, normalize_emotion  # noqa: F401
from kardia_rl.data.schema import Dialogue, TurnSample, expand_turns  # noqa: F401
from kardia_rl.data.splits import split_dialogues  # noqa: F401
from kardia_rl.data.validate import ValidationReport, check_record, load_dialogues, validate  # noqa: F401
