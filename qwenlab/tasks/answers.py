"""Reading an answer out of free text: the parsing rules behind every task's score().

Marker rule (numbers and words alike): if the text says "answer is" or "answer:" (any case,
"answer is:" too) and a number (or word) follows, the answer is the FIRST one after the LAST such
marker -- so "The answer is 42, not 41." reads 42. Otherwise the answer is the LAST number (or word)
in the text -- so "7 + 8 = 15, so 15" and "Reasoning: 3 * 4 = 12. Final: 13" read 15 and 13.

Numbers: an optional minus sign, digits, optional thousands commas, an optional decimal part.
  - Minus: the ASCII hyphen-minus "-" and the Unicode minus sign "\u2212" both count, but only when
    not directly after a letter or digit, so "37-85" reads as 37 and 85, not 37 and -85.
  - Commas group thousands: "1,234" is 1234 (a comma not followed by exactly three digits ends
    the number, so "1, 2, 3" is three numbers).
  - A trailing full stop is punctuation: "42." is 42. "42.0" equals 42.
  - Digits glued to letters are not numbers ("Qwen2.5" holds none).
Words: a run of ASCII letters; quotes and punctuation around it fall away; compared ignoring case.

Rewards are 0 or 1: partial credit (say, for a nearly reversed word) would reward near-misses that
a verifier should call wrong, and 0/1 keeps accuracy and RL rewards the same number.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from decimal import Decimal

# "is" must end there: "answer isn't 5" is no marker.
_MARKER = re.compile(r"answer\s*(?:is(?![\w'\u2019])\s*:?|:)", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-\u2212])|(?<![\w.]))"  # a sign only where no word or number precedes
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"         # 1,234 or 1234
    r"(?:\.(?P<frac>\d+))?"                          # decimals need digits after the point
)
_WORD = re.compile(r"[A-Za-z]+")


def _find(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The marker rule shared by numbers and words, in linear time.

    Two passes over the text (every marker, every candidate) and a binary search, instead of one
    search to the end of the text per marker: that was quadratic, and a foreign 64 KiB completion
    of repeated "answer is" took seconds to score. The result is the same because a marker never
    ends inside a candidate (it ends after "is", ":" or spaces, none of which a number or word
    continues through), so the first candidate starting at or after a marker's end is exactly what
    `pattern.search(text, marker.end())` finds.
    """
    candidates = list(pattern.finditer(text))
    if not candidates:
        return None
    starts = [m.start() for m in candidates]
    for end in reversed([m.end() for m in _MARKER.finditer(text)]):
        if end <= starts[-1]:  # the last marker with a candidate after it
            return candidates[bisect_left(starts, end)]
    return candidates[-1]


def find_number(text: str) -> Decimal | None:
    """The answer number in `text`, or None if it holds no number."""
    match = _find(_NUMBER, text)
    if match is None:
        return None
    value = Decimal(match["int"].replace(",", "") + (f".{match['frac']}" if match["frac"] else ""))
    return -value if match["sign"] else value


def find_word(text: str) -> str | None:
    """The answer word in `text`, lowercased, or None if it holds no letters."""
    match = _find(_WORD, text)
    return match.group().lower() if match else None


def score_number(completion: str, expected: str) -> float:
    """1.0 if the answer number in `completion` equals the integer `expected`, else 0.0."""
    found = find_number(completion)
    return 1.0 if found is not None and found == Decimal(expected) else 0.0


def score_word(completion: str, expected: str) -> float:
    """1.0 if the answer word in `completion` equals `expected` ignoring case, else 0.0."""
    found = find_word(completion)
    return 1.0 if found is not None and found == expected.lower() else 0.0
