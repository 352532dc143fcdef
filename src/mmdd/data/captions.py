"""Caption pre-processing as BLIP does it: lower-case, punctuation to spaces, at most N words."""

from __future__ import annotations

import re

from mmdd.errors import DataError

_PUNCT = re.compile(r"[^\w\s-]|_")
_SPACES = re.compile(r"\s+")


def preprocess_caption(text: str, max_words: int | None = 30) -> str:
    text = _PUNCT.sub(" ", text.lower())
    words = _SPACES.sub(" ", text).strip().split(" ")
    if max_words is not None:
        words = words[: int(max_words)]
    return " ".join(w for w in words if w)


def normalize_captions(captions, enabled: bool, max_words: int | None, source: str) -> list[str]:
    """Pre-process (or only strip) captions; an empty or non-string caption is an error naming `source`."""
    out = []
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise DataError(f"{source}: caption {i} is {type(c).__name__}, expected a string")
        text = preprocess_caption(c, max_words) if enabled else c.strip()
        if not text:
            raise DataError(
                f"{source}: caption {i} ({c!r}) is empty after pre-processing; fix or remove it from the annotation file"
            )
        out.append(text)
    return out
