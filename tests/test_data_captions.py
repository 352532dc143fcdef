"""BLIP-style caption pre-processing and the per-caption checks of the loaders."""

import pytest

from mmdd.data.captions import normalize_captions, preprocess_caption
from mmdd.errors import DataError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Dog, running! On the (wet) grass.", "a dog running on the wet grass"),
        ('He said: "hi"; #tag ~ok*?', "he said hi tag ok"),
        ("The dog's ball", "the dog s ball"),  # apostrophe -> space, as ALBEF/BLIP do
        ("  multiple   spaces\n\tand tabs ", "multiple spaces and tabs"),
        ("well-known t-shirt", "well-known t-shirt"),  # hyphens stay
        ("2 cats & 3 dogs / 1 bird", "2 cats 3 dogs 1 bird"),  # digits stay, symbols go
        ("snake_case [brackets] {braces}", "snake case brackets braces"),
        ("Café Crème", "café crème"),  # letters of any script stay
    ],
)
def test_preprocess_examples(raw, expected):
    assert preprocess_caption(raw) == expected


def test_max_words():
    long = " ".join(f"w{i}" for i in range(40))
    assert preprocess_caption(long).split() == [f"w{i}" for i in range(30)]
    assert preprocess_caption(long, max_words=3) == "w0 w1 w2"
    assert len(preprocess_caption(long, max_words=None).split()) == 40
    # punctuation-only "words" do not count towards the limit
    assert preprocess_caption("a , , , b c", max_words=2) == "a b"
    with pytest.raises(DataError, match="max_words"):
        preprocess_caption("a b", max_words=0)


def test_normalize_enabled_and_disabled():
    assert normalize_captions(["A Cat!", " Dog. "], True, 30, "f.json: entry 0") == ["a cat", "dog"]
    assert normalize_captions(["A Cat!", " Dog. "], False, 30, "f.json: entry 0") == ["A Cat!", "Dog."]


@pytest.mark.parametrize(
    "caps, enabled, match",
    [
        (["ok", "?!..."], True, r"f.json: entry 7: caption 1 \('\?!\.\.\.'\) is empty after pre-processing"),
        (["ok", "   "], False, r"f.json: entry 7: caption 1 .* is empty"),
        (["ok", None], True, r"f.json: entry 7: caption 1 is NoneType .* expected a string"),
        ([3], True, r"f.json: entry 7: caption 0 is int"),
    ],
)
def test_normalize_errors_name_source_and_index(caps, enabled, match):
    with pytest.raises(DataError, match=match):
        normalize_captions(caps, enabled, 30, "f.json: entry 7")


def test_reference_caption_styles_follow_blip_and_albef_exactly():
    from mmdd.data.captions import preprocess_caption

    raw = "A man, in a red-shirt!  Jumps: the dog's \"ball\"?\n"
    # BLIP (the MTT-VL/LoRS/RepBlend loaders): .!"()*#:;~ to spaces, whitespace runs to one space; , ' ? and - stay
    assert preprocess_caption(raw, 30, "blip") == "a man, in a red-shirt jumps the dog's ball ?"
    # ALBEF: ,.'!?"()*#:;~ deleted, - and / to spaces
    assert preprocess_caption(raw, 30, "albef") == "a man in a red shirt jumps the dogs ball"
    assert preprocess_caption("<person> rides a bike/car", 30, "albef") == "person rides a bike car"
    assert preprocess_caption("one two three", 2, "blip") == "one two"
    assert preprocess_caption("a\nb", 30, "blip") == "a\nb"  # a single newline is not a run: the reference keeps it
    assert preprocess_caption("a\nb", 30, "mmdd") == "a b"


def test_flickr_and_coco_use_the_blip_style():
    from omegaconf import OmegaConf

    from mmdd.paths import conf_dir

    for name in ("flickr30k", "coco"):
        assert OmegaConf.load(conf_dir() / "data" / f"{name}.yaml").preprocess.style == "blip"
