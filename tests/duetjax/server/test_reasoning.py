"""Reasoning parsers (--reasoning-parser): the split on texts, streaming (any split) equal to the
whole text, and reasoning_content through the chat response and stream on scripted outputs."""
from __future__ import annotations


import pytest

from duetjax.serve import parse_args
from duetjax.server.chat import ChatCompletions
from duetjax.server.protocol import ChatCompletionRequest, ChatResponseMessage, DeltaMessage
from duetjax.server.reasoning import (DeepSeekR1ReasoningParser, Qwen3ReasoningParser,
                                      ReasoningStream, extract_reasoning, reasoning_parser)
from duetjax.server.tool_calls import ToolCallConfig

from .test_tool_calls import WEATHER, answer_both_ways, chat_completions, outputs_of, stream_cuts

QWEN3 = Qwen3ReasoningParser()
R1 = DeepSeekR1ReasoningParser()

QWEN3_CASES = [
    # (id, text, reasoning, content)
    ("both", "<think>\nhmm, 2+2\n</think>\n\nIt is 4.", "\nhmm, 2+2\n", "\n\nIt is 4."),
    ("no-think", "It is 4.", None, "It is 4."),
    ("empty-reasoning", "<think></think>It is 4.", None, "It is 4."),
    ("unclosed", "<think>still thinking", "still thinking", ""),
    ("only-reasoning", "<think>x</think>", "x", ""),
    ("text-before", "ok <think>a</think>b", "a", "ok b"),
    ("only-end-marker", "a</think>b", None, "a</think>b"),
    ("second-think-is-content", "<think>a</think>b<think>c</think>", "a", "b<think>c</think>"),
    ("partial-start-at-end", "text <thi", None, "text <thi"),
    ("partial-end-at-end", "<think>r </thi", "r </thi", ""),
    ("unicode", "<think>日本語 🙂</think>é", "日本語 🙂", "é"),
    ("empty", "", None, ""),
]

R1_CASES = [
    ("both", "hmm, 2+2\n</think>\n\nIt is 4.", "hmm, 2+2\n", "\n\nIt is 4."),
    ("with-think", "<think>hmm</think>It is 4.", "hmm", "It is 4."),
    ("no-end-is-all-reasoning", "still thinking", "still thinking", ""),
    ("think-no-end", "<think>still", "still", ""),
    ("empty-reasoning", "</think>It is 4.", None, "It is 4."),
    ("think-empty-reasoning", "<think></think>x", None, "x"),
    ("only-reasoning", "x</think>", "x", ""),
    ("think-later-stays", "a <think> b</think>c", "a <think> b", "c"),
    ("partial-start", "<thi", "<thi", ""),
    ("partial-end-at-end", "r </thi", "r </thi", ""),
    ("empty", "", None, ""),
]


@pytest.mark.parametrize("text,reasoning,content", [c[1:] for c in QWEN3_CASES],
                         ids=[c[0] for c in QWEN3_CASES])
def test_qwen3(text, reasoning, content):
    assert extract_reasoning(text, QWEN3) == (reasoning, content)


@pytest.mark.parametrize("text,reasoning,content", [c[1:] for c in R1_CASES],
                         ids=[c[0] for c in R1_CASES])
def test_deepseek_r1(text, reasoning, content):
    assert extract_reasoning(text, R1) == (reasoning, content)


def streamed(parser, text: str, cuts: list[int]) -> tuple[str | None, str]:
    """Reasoning and content sent by a ReasoningStream fed the prefixes of ``text`` ending at
    ``cuts`` (then the whole text, final)."""
    stream = ReasoningStream(parser)
    reasoning, content = "", ""
    for end in [*cuts, len(text)]:
        delta, decided = stream.step(text[:end], final=end == len(text))
        reasoning += delta
        content += stream.content_delta(decided)
    return reasoning or None, content


@pytest.mark.parametrize("parser,text", [(QWEN3, c[1]) for c in QWEN3_CASES]
                         + [(R1, c[1]) for c in R1_CASES],
                         ids=[f"qwen3-{c[0]}" for c in QWEN3_CASES]
                         + [f"deepseek_r1-{c[0]}" for c in R1_CASES])
def test_streaming_any_split_equals_the_whole_text(parser, text):
    whole = extract_reasoning(text, parser)
    for cuts in stream_cuts(text):
        assert streamed(parser, text, cuts) == whole


def test_partial_markers_are_held_back_while_streaming():
    stream = ReasoningStream(QWEN3)
    assert stream.step("<thi", final=False) == ("", "")
    assert stream.step("<think>a </th", final=False) == ("a ", "")
    assert stream.step("<think>a </think>b", final=False) == ("", "b")
    stream = ReasoningStream(R1)
    assert stream.step("<th", final=False) == ("", "")
    assert stream.step("<think>x</", final=False) == ("x", "")
    assert stream.step("<think>x</think", final=False) == ("", "")
    assert stream.step("<think>x</think>", final=True) == ("", "")


def test_unknown_parser_and_cli_flag():
    assert reasoning_parser(None) is None
    assert reasoning_parser("qwen3").name == "qwen3"
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("nope")
    assert parse_args(["--reasoning-parser", "deepseek_r1"]).reasoning_parser == "deepseek_r1"
    assert parse_args([]).reasoning_parser is None
    with pytest.raises(SystemExit):
        parse_args(["--reasoning-parser", "nope"])


def test_no_reasoning_serializes_as_before():
    assert ChatResponseMessage(content="x").model_dump() == {"role": "assistant", "content": "x"}
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert ChatResponseMessage(content=None, reasoning_content="r").model_dump() == {
        "role": "assistant", "content": None, "reasoning_content": "r"}


# ---- through ChatCompletions, on scripted engine outputs -------------------------------------

def run_both(parser_name: str, texts: list[str], finish_reason: str = "stop", tools: bool = False):
    """(non-streaming choice, (reasoning, content, calls, finishes) summed over the SSE chunks)."""
    chat = chat_completions()
    chat = ChatCompletions(chat.serving, ToolCallConfig("hermes"), reasoning_parser(parser_name))
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                tools=[WEATHER] if tools else None, stream=True)
    return answer_both_ways(chat, req, outputs_of(texts, finish_reason))


QWEN3_SCRIPT = ("<think>\nThe user wants the weather.\n</think>\n\nChecking.\n"
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.mark.parametrize("step", [1, 3, 17, len(QWEN3_SCRIPT)])
def test_reasoning_then_tool_call_streamed_equals_non_streamed(step):
    texts = [QWEN3_SCRIPT[:end] for end in range(step, len(QWEN3_SCRIPT), step)] + [QWEN3_SCRIPT]
    body, (reasoning, content, calls, finishes) = run_both("qwen3", texts, tools=True)
    message = body["message"]
    assert message["reasoning_content"] == reasoning == "\nThe user wants the weather.\n"
    assert message["content"] == content == "\n\nChecking.\n"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert body["finish_reason"] == "tool_calls" and finishes == ["tool_calls"]


def test_a_tool_call_inside_the_reasoning_is_not_a_call():
    text = '<think><tool_call>{"name": "a"}</tool_call></think>Done.'
    body, (reasoning, content, calls, _) = run_both("qwen3", [text[:9], text], tools=True)
    inner = '<tool_call>{"name": "a"}</tool_call>'
    assert body["message"]["reasoning_content"] == reasoning == inner
    assert body["message"]["content"] == content == "Done." and calls == []
    assert "tool_calls" not in body["message"]


@pytest.mark.parametrize("step", [1, 5])
def test_deepseek_r1_cut_off_is_all_reasoning_with_null_content(step):
    text = "Let me think about 2+2. It is"
    texts = [text[:end] for end in range(step, len(text), step)] + [text]
    body, (reasoning, content, _, finishes) = run_both("deepseek_r1", texts, "length")
    assert body["message"] == {"role": "assistant", "content": None, "reasoning_content": text}
    assert reasoning == text and content == "" and finishes == ["length"]


def test_deepseek_r1_answer_without_tools():
    text = "<think>2+2=4</think>\n\nFour."
    body, (reasoning, content, _, _) = run_both("deepseek_r1", [text[:3], text[:12], text])
    assert body["message"] == {"role": "assistant", "content": "\n\nFour.",
                               "reasoning_content": "2+2=4"}
    assert reasoning == "2+2=4" and content == "\n\nFour."


def test_qwen3_without_thinking_is_plain_content():
    body, (reasoning, content, _, _) = run_both("qwen3", ["It is", "It is 4."])
    assert body["message"] == {"role": "assistant", "content": "It is 4."}
    assert reasoning == "" and content == "It is 4."
