"""How much of a generated text is real words: the share of its words that occur in the training text.

A word is a run of letters (with an inner apostrophe: "nation's"), compared in lower case. A cheap, honest
check of fluency at the character level that bits per byte do not show: a byte LM can have a fair bpb and
still spell "discribition".
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def vocabulary(text: str) -> set[str]:
    return set(words(text))


def word_share(texts: list[str] | str, vocab: set[str]) -> tuple[float, int]:
    """(share of the words of ``texts`` found in ``vocab``, number of words); (nan, 0) for no words."""
    found = [w for t in ([texts] if isinstance(texts, str) else texts) for w in words(t)]
    if not found:
        return float("nan"), 0
    return sum(w in vocab for w in found) / len(found), len(found)
