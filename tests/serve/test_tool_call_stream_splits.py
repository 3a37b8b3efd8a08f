"""The streamed tool-call parser gives the same calls and content however the text is cut into deltas.

A server coalesces tokens into one delta when its reader is slow, so the cut points are timing: a call whose
closing bracket arrives with its closing tag must come out as the one whose bracket arrived alone."""
import itertools

import pytest

from qwenlab.serve.tool_calls import ToolCallParser, collect_items

NAMES = {"get_weather"}
TEXTS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # committed, then bad JSON
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris"\n</tool_call> done',  # never closes
    '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',  # not offered: content
    'Sure <tool_call',
]


def parse_in_pieces(text: str, cuts: tuple[int, ...]):
    parser, items, last = ToolCallParser(NAMES), [], 0
    for cut in (*cuts, len(text)):
        items += parser.feed(text[last:cut])
        last = cut
    answer = collect_items(items + parser.finish())
    return answer.content, [(c["name"], c["arguments"]) for c in answer.tool_calls]


def commit_point(text: str) -> int:
    """Where a stream commits to the call: its name is read and its arguments' object has begun. A call
    whose whole text arrives in one delta is judged whole (bad JSON is then content, as non-streamed)."""
    key = '"arguments": '
    return text.index(key) + len(key) + 1 if key in text else 1


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_after_the_commit_every_split_parses_as_the_char_by_char_stream(text):
    one_by_one = parse_in_pieces(text, tuple(range(1, len(text))))
    commit = commit_point(text)
    for cuts in itertools.combinations(range(commit + 1, len(text)), 2):
        assert parse_in_pieces(text, (commit, *cuts)) == one_by_one, cuts


def test_a_committed_call_with_bad_json_keeps_its_arguments_as_written():
    text = TEXTS[0]
    expected = (None, [("get_weather", '{"city": }')])
    cut = text.index("}")  # the closing bracket arrives together with the closing tag
    assert parse_in_pieces(text, (commit_point(text), cut)) == expected
    assert parse_in_pieces(text, tuple(range(1, len(text)))) == expected


def test_unclosed_arguments_end_before_the_closing_tag():
    text = TEXTS[2]
    expected = ("done", [("get_weather", '{"city": "Pa}ris"')])
    assert parse_in_pieces(text, tuple(range(1, len(text)))) == expected
    assert parse_in_pieces(text, (commit_point(text),)) == expected


def test_valid_calls_and_plain_content_parse_the_same_in_any_split():
    for text in TEXTS[1], TEXTS[3], TEXTS[4]:
        whole = parse_in_pieces(text, ())
        for cuts in itertools.combinations(range(1, len(text)), 2):
            assert parse_in_pieces(text, cuts) == whole, (text, cuts)
