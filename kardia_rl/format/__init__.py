"""The four-span output format: special tokens, strict parser, prompt builder, tokenizer helper."""
from kardia_rl.format.spans import (  # noqa: F401
    SPAN_NAMES, SPAN_TOKENS, FourSpans, ParseResult, SpanError, parse_spans, render_spans,
)
from kardia_rl.format.prompt import (  # noqa: F401
    DEFAULT_SYSTEM_TEMPLATE, build_messages, build_prompt, build_system_prompt, visible_history,
)
