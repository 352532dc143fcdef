"""Caption pre-processing (`data.preprocess.style`), each style a reference's exact rules or mmdd's own:

- `blip`: BLIP's `pre_caption`, which the MTT-VL, LoRS and RepBlend data loaders copy: lower-case; the characters
  ``.!"()*#:;~`` become spaces; runs of two or more whitespace characters become one space; trailing newlines
  and surrounding spaces are stripped; at most `max_words` space-separated words. Commas, apostrophes and
  question marks stay.
- `albef`: ALBEF's `pre_caption`: lower-case; ``,.'!?"()*#:;~`` are deleted (not spaced); "-" and "/" become
  spaces and "<person>" becomes "person"; then as blip.
- `mmdd`: every punctuation/symbol character becomes a space, letters (any script), digits and hyphens stay, all
  whitespace collapses; at most `max_words` words. Used by the generated dataset and plain tables.
"""

from __future__ import annotations

import re

from mmdd.errors import DataError

# Anything that is not a letter/digit (\w minus "_"), whitespace or "-" becomes a space.
_PUNCT = re.compile(r"[^\w\s-]|_")
_SPACES = re.compile(r"\s+")


STYLES = ("mmdd", "blip", "albef")
_BLIP_PUNCT = re.compile(r'[.!"()*#:;~]')
_ALBEF_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_RUNS = re.compile(r"\s{2,}")


def _reference_rules(text: str, max_words: int | None) -> str:
    """What BLIP's and ALBEF's pre_caption do after their character rules."""
    text = _RUNS.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if max_words is not None and len(words) > int(max_words):
        text = " ".join(words[: int(max_words)])
    return text


def preprocess_caption(text: str, max_words: int | None = 30, style: str = "mmdd") -> str:
    """The caption cleaned by `style`'s rules; "" when nothing but punctuation was there."""
    if max_words is not None and int(max_words) < 1:
        raise DataError(f"data.preprocess.max_words must be a positive integer or null, got {max_words!r}")
    if style == "blip":
        return _reference_rules(_BLIP_PUNCT.sub(" ", text.lower()), max_words)
    if style == "albef":
        text = _ALBEF_PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
        return _reference_rules(text, max_words)
    if style != "mmdd":
        raise DataError(f"data.preprocess.style must be one of {STYLES}, got {style!r}")
    words = _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip().split()
    if max_words is not None:
        words = words[: int(max_words)]
    return " ".join(words)


def normalize_captions(captions, enabled: bool | str, max_words: int | None, source: str) -> list[str]:
    """Pre-process (or, when disabled, only strip) captions. `enabled`: False, True (the mmdd style) or a style.

    A caption that is not a string, or is empty afterwards, raises DataError naming `source`
    (the annotation file and entry) and the caption's index within that entry.
    """
    out = []
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise DataError(
                f"{source}: caption {i} is {type(c).__name__} ({c!r}), expected a string; fix the annotation file"
            )
        style = "mmdd" if enabled is True else enabled
        text = preprocess_caption(c, max_words, style) if enabled else c.strip()
        if not text:
            raise DataError(
                f"{source}: caption {i} ({c!r}) is empty after pre-processing; fix or remove it from the annotation file"
            )
        out.append(text)
    return out
