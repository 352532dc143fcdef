"""Every annotation loader on real-format files, and each malformed case with its message."""

import json

import pytest
from PIL import Image

from mmdd.data.annotations import load_blip_split, load_karpathy, load_pairs_table
from mmdd.errors import DataError


def png(path, color=(255, 0, 0), size=8, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path)
    return path


@pytest.fixture
def root(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        png(tmp_path / "imgs" / name)
    return tmp_path


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_blip_train_groups_captions_by_image(root):
    ann = write_json(root / "train.json", [
        {"image": "imgs/a.jpg", "caption": "A cat.", "image_id": 1},
        {"image": "imgs/b.jpg", "caption": "A dog", "image_id": 2},
        {"image": "imgs/a.jpg", "caption": "a cat sitting", "image_id": 1},
    ])
    s = load_blip_split(ann, root, "train")
    assert [p.name for p in s.image_paths] == ["a.jpg", "b.jpg"]
    assert s.captions == ["a cat", "a dog", "a cat sitting"]
    assert s.txt2img == [0, 1, 0]
    assert s.img2txt() == [[0, 2], [1]]


def test_blip_test_lists_with_six_captions(root):
    ann = write_json(root / "test.json", [
        {"image": "imgs/a.jpg", "caption": [f"cap {i}" for i in range(5)]},
        {"image": "imgs/c.jpg", "caption": [f"other {i}" for i in range(6)]},
    ])
    s = load_blip_split(ann, root, "test")
    assert s.num_images == 2 and s.num_captions == 11
    assert s.txt2img == [0] * 5 + [1] * 6


def test_blip_preprocessing_can_be_switched_off(root):
    ann = write_json(root / "t.json", [{"image": "imgs/a.jpg", "caption": "A Cat!"}])
    assert load_blip_split(ann, root, "train", preprocess=False).captions == ["A Cat!"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"image": "imgs/a.jpg", "caption": "x"', r"not valid JSON: .* line 1"),
        ('{"image": "imgs/a.jpg"}', "top level must be a list"),
        ('[{"image": "imgs/a.jpg"}]', r"entry 0 has no 'caption' field"),
        ('[{"caption": "x"}]', r"entry 0 has no 'image' field"),
        ('[{"image": "imgs/a.jpg", "caption": "x"}, {"image": "imgs/a.jpg", "caption": "?!"}]', r"entry 1: caption 0 .* empty after pre-processing"),
        ('[{"image": "imgs/a.jpg", "caption": 5}]', r"entry 0: field 'caption' must be a string"),
        ('[{"image": "imgs/missing.jpg", "caption": "x"}]', r"entry 0: image .*missing.jpg does not exist; check data.image_root"),
        ("[]", "has no entries"),
        ('[{"image": "imgs/a.jpg", "caption": []}]', r"entry 0: field 'caption' is an empty list"),
        ('[{"image": "imgs/a.jpg", "caption": ["ok", 7]}]', r"entry 0: caption 1 is int"),
        ('[{"image": 3, "caption": "x"}]', r"entry 0: field 'image' must be a non-empty string"),
        ('["imgs/a.jpg"]', r"entry 0 must be an object"),
        ('[{"image": "imgs/a.jpg", "caption": "x"},\n {"image": "imgs/b.jpg", "caption": "y",}]',
         r"not valid JSON: .* line 2, column"),
    ],
)
def test_blip_malformed_files_name_file_and_field(root, content, match):
    ann = root / "bad.json"
    ann.write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        load_blip_split(ann, root, "train")
    assert "bad.json" in str(exc.value)


def test_missing_annotation_file_says_where_files_come_from(root):
    with pytest.raises(DataError, match=r"flickr30k_train.json does not exist.*BLIP repository"):
        load_blip_split(root / "annotations" / "flickr30k_train.json", root, "train")


def test_karpathy_restval_joins_train_and_filepath(root):
    png(root / "imgs" / "val2014" / "v.jpg")
    doc = {"images": [
        {"filepath": "", "filename": "imgs/a.jpg", "split": "train", "sentences": [{"raw": "A one."}, {"raw": "a two"}]},
        {"filename": "imgs/b.jpg", "split": "restval", "sentences": [{"raw": "b"}]},
        {"filepath": "imgs/val2014", "filename": "v.jpg", "split": "val", "sentences": [{"raw": "v"}]},
        {"filename": "imgs/c.jpg", "split": "test", "sentences": [{"raw": "c1"}, {"raw": "c2"}]},
    ]}
    splits = load_karpathy(write_json(root / "dataset_coco.json", doc), root)
    assert splits["train"].num_images == 2 and splits["train"].captions == ["a one", "a two", "b"]
    assert splits["val"].image_paths[0] == root / "imgs" / "val2014" / "v.jpg"
    assert splits["test"].txt2img == [0, 0]


def test_karpathy_errors(root):
    bad = write_json(root / "k.json", {"images": [{"filename": "imgs/a.jpg", "split": "train", "sentences": [{"tokens": []}]}]})
    with pytest.raises(DataError, match=r"k.json: images\[0\].sentences\[0\] has no 'raw' field"):
        load_karpathy(bad, root)
    bad = write_json(root / "k2.json", {"images": [{"filename": "imgs/a.jpg", "split": "holdout", "sentences": [{"raw": "x"}]}]})
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_karpathy(bad, root)
    with pytest.raises(DataError, match="Karpathy format"):
        load_karpathy(write_json(root / "k3.json", []), root)


def test_jsonl_and_csv_tables(root):
    jl = root / "train.jsonl"
    jl.write_text('{"image": "imgs/a.jpg", "caption": "one"}\n\n{"image": "imgs/b.jpg", "caption": "two"}\n'
                  '{"image": "imgs/a.jpg", "caption": "three"}\n')
    s = load_pairs_table(jl, root, "train")
    assert s.num_images == 2 and s.txt2img == [0, 1, 0]
    csv = root / "val.csv"
    csv.write_text('image,caption\nimgs/a.jpg,"Hello, world"\nimgs/c.jpg,bye\n')
    s = load_pairs_table(csv, root, "val")
    assert s.captions == ["hello world", "bye"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("t.jsonl", '{"image": "imgs/a.jpg", "caption": "ok"}\n{"image": "imgs/a.jpg"\n', r"t.jsonl: line 2 is not valid JSON"),
        ("t.jsonl", '{"image": "imgs/a.jpg", "text": "ok"}\n', r"line 1 needs the fields 'image' and 'caption'"),
        ("t.csv", "path,text\nimgs/a.jpg,x\n", r"t.csv: the header \(line 1\) must name the columns 'image' and 'caption'"),
        ("t.csv", "image,caption\nimgs/a.jpg,\n", r"t.csv: line 2: caption 0 .* empty"),
        ("t.txt", "[]", "use .jsonl or .csv"),
        ("pairs.jsonl", None, r"pairs.jsonl does not exist"),
        ("m.jsonl", '{"image": "imgs/a.jpg", "caption": "ok"}\n{"image": "imgs/nope.jpg", "caption": "x"}\n',
         r"m.jsonl: line 2: image .*nope.jpg does not exist; check data.image_root"),
        ("m.jsonl", '{"image": "imgs/a.jpg", "caption": ["a", "b"]}\n', r"m.jsonl: line 1: caption 0 is list"),
        ("short.csv", "image,caption\nimgs/a.jpg,fine\nimgs/b.jpg\n", r"short.csv: line 3 has 1 columns"),
        ("empty.jsonl", "\n\n", r"empty.jsonl: the train split has no rows"),
    ],
)
def test_table_errors_name_file_and_line(root, name, content, match):
    path = root / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_pairs_table(path, root, "train")


def test_blip_image_paths_are_absolute_and_dirs_are_not_images(root, monkeypatch):
    ann = write_json(root / "t.json", [{"image": "imgs/a.jpg", "caption": "x"}])
    monkeypatch.chdir(root)
    s = load_blip_split(ann, ".", "train")
    assert s.image_paths[0].is_absolute() and s.image_paths[0].is_file()
    (root / "imgs" / "d.jpg").mkdir()
    with pytest.raises(DataError, match=r"t2.json: entry 0: image .*d.jpg is not a file"):
        load_blip_split(write_json(root / "t2.json", [{"image": "imgs/d.jpg", "caption": "x"}]), root, "train")


def test_annotation_path_that_is_a_directory(root):
    (root / "ann.json").mkdir()
    with pytest.raises(DataError, match=r"ann.json is not a file"):
        load_blip_split(root / "ann.json", root, "test")


def test_non_utf8_annotation_file(root):
    ann = root / "latin.json"
    ann.write_bytes('[{"image": "imgs/a.jpg", "caption": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.json is not UTF-8"):
        load_blip_split(ann, root, "train")


def test_karpathy_field_types_and_missing_image(root):
    cases = [
        ({"filename": "imgs/a.jpg", "split": ["train"], "sentences": [{"raw": "x"}]}, r"images\[0\]: field 'split' must be a non-empty string"),
        ({"filename": 5, "split": "train", "sentences": [{"raw": "x"}]}, r"images\[0\]: field 'filename' must be"),
        ({"filepath": 1, "filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]}, r"field 'filepath' must be a string"),
        ({"filename": "imgs/a.jpg", "split": "train", "sentences": []}, r"'sentences' must be a non-empty list"),
        ({"filename": "imgs/a.jpg", "split": "train"}, r"images\[0\] has no 'sentences' field"),
        ({"filename": "imgs/a.jpg", "split": "train", "sentences": [{"raw": "..."}]}, r"images\[0\]: caption 0 .* empty"),
        ({"filepath": "val2014", "filename": "zz.jpg", "split": "val", "sentences": [{"raw": "x"}]},
         r"images\[0\]: image .*val2014.zz.jpg does not exist; check data.image_root"),
    ]
    for i, (entry, match) in enumerate(cases):
        ann = write_json(root / f"dataset_{i}.json", {"images": [entry]})
        with pytest.raises(DataError, match=match) as exc:
            load_karpathy(ann, root)
        assert f"dataset_{i}.json" in str(exc.value)
    with pytest.raises(DataError, match=r"dataset_flickr30k.json does not exist.*karpathy"):
        load_karpathy(root / "dataset_flickr30k.json", root)
    bad = root / "dataset_trunc.json"
    bad.write_text('{"images": [{"filename": "imgs/a.jpg",')
    with pytest.raises(DataError, match=r"dataset_trunc.json is not valid JSON: .* line 1"):
        load_karpathy(bad, root)


def test_csv_with_bom_spaces_extra_columns_and_quotes(root):
    csv = root / "excel.csv"
    csv.write_bytes("\ufeffid, image ,caption\r\n1,imgs/a.jpg,\"A \"\"quoted\"\", caption\"\r\n\r\n2,imgs/b.jpg,B\r\n".encode("utf-8"))
    s = load_pairs_table(csv, root, "train")
    assert s.captions == ["a quoted caption", "b"] and s.txt2img == [0, 1]
