"""Caption pre-processing as BLIP/ALBEF do it: lower-case, punctuation to spaces, at most N words.

BLIP's `pre_caption` replaces the characters ``,.'!?"()*#:;~`` by spaces; we replace every
punctuation/symbol character the same way and keep letters (any script), digits and hyphens
("t-shirt", "well-known"). Whitespace is collapsed and the caption truncated to `max_words` words.
"""

from __future__ import annotations

import re

from mmdd.errors import DataError

# Anything that is not a letter/digit (\w minus "_"), whitespace or "-" becomes a space.
_PUNCT = re.compile(r"[^\w\s-]|_")
_SPACES = re.compile(r"\s+")


def preprocess_caption(text: str, max_words: int | None = 30) -> str:
    """BLIP-style caption cleaning; returns "" when nothing but punctuation was there."""
    if max_words is not None and int(max_words) < 1:
        raise DataError(f"data.preprocess.max_words must be a positive integer or null, got {max_words!r}")
    words = _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip().split()
    if max_words is not None:
        words = words[: int(max_words)]
    return " ".join(words)


def normalize_captions(captions, enabled: bool, max_words: int | None, source: str) -> list[str]:
    """Pre-process (or, when disabled, only strip) captions.

    A caption that is not a string, or is empty afterwards, raises DataError naming `source`
    (the annotation file and entry) and the caption's index within that entry.
    """
    out = []
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise DataError(
                f"{source}: caption {i} is {type(c).__name__} ({c!r}), expected a string; fix the annotation file"
            )
        text = preprocess_caption(c, max_words) if enabled else c.strip()
        if not text:
            raise DataError(
                f"{source}: caption {i} ({c!r}) is empty after pre-processing; fix or remove it from the annotation file"
            )
        out.append(text)
    return out
