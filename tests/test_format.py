import pytest

from kardia_rl.format import SPAN_TOKENS, build_messages, parse_spans, render_spans
from kardia_rl.format.tokens import add_span_tokens

OK = render_spans("u text", "r text", "sad", "I'm here for you.")


def test_valid_answer_parses():
    r = parse_spans(OK)
    assert r.ok and r.spans.emotion == "sad" and r.spans.response == "I'm here for you." and r.reason == "ok"
    assert parse_spans("  \n" + OK.replace("><", ">\n<") + "\n").ok  # whitespace between spans is fine


@pytest.mark.parametrize("text, code, fragment", [
    (OK.replace("<|reasoning_begin|>r text<|reasoning_end|>", ""), "missing", "'reasoning' span is missing"),
    (OK + "<|response_begin|>again<|response_end|>", "duplicated", "'response' span appears 2 times"),
    (render_spans("u", "r", "sad", "x").replace("<|emotion_begin|>sad<|emotion_end|>", "")
     + "<|emotion_begin|>sad<|emotion_end|>", "out_of_order", "spans out of order"),
    (render_spans("u", " ", "sad", "x"), "empty", "'reasoning' span is empty"),
    ("Sure! " + OK, "outside_text", "text outside spans: 'Sure!'"),
    (OK + " trailing", "outside_text", "text outside spans: 'trailing'"),
    (OK.replace("<|response_end|>", ""), "unclosed", "'response' is never closed"),
    (OK.replace("<|emotion_end|>", "<|response_end|>", 1), "nested", "end tag inside unclosed 'emotion'"),
    ("<|understanding_end|>" + OK, "unmatched_end", "end tag without a begin tag"),
    ("", "missing", "'understanding' span is missing"),
])
def test_invalid_answers_give_precise_reasons(text, code, fragment):
    r = parse_spans(text)
    assert not r.ok and r.spans is None
    assert code in {e.code for e in r.errors}, r.errors
    assert fragment in r.reason


def test_found_keeps_partial_spans():
    r = parse_spans("<|emotion_begin|>anxious<|emotion_end|><|response_begin|>hi<|response_end|>")
    assert not r.ok and r.found == {"emotion": "anxious", "response": "hi"}


def test_xml_notation_and_auto():
    xml = "<understanding>u</understanding><reasoning>r</reasoning><emotion>sad</emotion><response>hey</response>"
    assert not parse_spans(xml).ok
    assert parse_spans(xml, "xml").ok and parse_spans(xml, "auto").spans.response == "hey"
    assert parse_spans(OK, "auto").ok


def test_strip_span_tags_and_visible_response():
    from kardia_rl.format.spans import strip_span_tags, visible_response

    # both notations go, a tag between two words leaves one space, whitespace runs collapse
    assert strip_span_tags("<|emotion_begin|>sad<|emotion_end|><response>Hi\n  there</response>") == "sad Hi there"
    assert strip_span_tags("<|reply_begin|>x") == "<|reply_begin|>x"  # only the four span names are tags
    broken = "<|reasoning_begin|>secret plan<|reasoning_end|><|response_begin|> <|response_end|> tail"
    # a closed but empty response span is what the user saw: the reasoning is never shown in its place
    assert visible_response(parse_spans(broken), broken) == ""
    unclosed = "<|understanding_begin|>u<|understanding_end|><|response_begin|>Hello<|emotion_end|>"
    assert visible_response(parse_spans(unclosed), unclosed) == "u Hello"
    assert visible_response(parse_spans(OK), OK) == "I'm here for you."


def test_build_messages_history_modes():
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": OK}, {"role": "user", "content": "more"}]
    m = build_messages("MBTI: INFJ", "lost keys", hist)
    assert m[0]["role"] == "system" and "MBTI: INFJ" in m[0]["content"] and "lost keys" in m[0]["content"]
    assert m[2]["content"] == "I'm here for you."
    assert build_messages("p", "s", hist, history_mode="full")[2]["content"] == OK
    assert build_messages("p", "s", hist, system="custom")[0]["content"] == "custom"
    assert [x["content"] for x in build_messages("p", "s", hist, max_history_turns=1)[1:]] == ["more"]


def test_add_span_tokens_to_a_plain_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))
    assert add_span_tokens(tok, model) == 8
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 11
    ids = tok.encode(OK, add_special_tokens=False)
    assert sum(i in {tok.convert_tokens_to_ids(t) for t in SPAN_TOKENS} for i in ids) == 8
    assert add_span_tokens(tok, model) == 0  # idempotent
