"""`mmdd export` writes a plain dataset that the pairs-table loader (and load_export) read back."""

import json

import pytest
import torch

from mmdd.commands import export as export_command
from mmdd.data.annotations import load_pairs_table
from mmdd.data.images import load_images_tensor
from mmdd.data.transforms import normalize
from mmdd.synthetic.export import export_synthetic, load_export
from mmdd.synthetic.similarity import LowRankSimilarity
from mmdd.synthetic.synthetic_set import SyntheticSet

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture
def saved_set(tmp_path):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    images = normalize(pixels, MEAN, STD)
    texts = torch.randn(6, 12, generator=g)
    sim = LowRankSimilarity(6, rank=2, alpha=1.0, generator=g)
    with torch.no_grad():
        sim.right.normal_(generator=g)  # a non-identity S
    syn = SyntheticSet(images, texts, {"image": 0.05, "text": 0.07}, sim)
    captions = [f"a caption number {i}" for i in range(6)]
    syn.save(tmp_path / "set", {"method": "lors", "budget": 7, "mean": MEAN, "std": STD, "text_encoder": "enc",
                                "inner_loss": "wbce"}, captions)
    return tmp_path / "set", syn, pixels, captions


def test_export_round_trip(saved_set, tmp_path):
    src, syn, pixels, captions = saved_set
    out = export_synthetic(src, tmp_path / "export")
    # the plain pairs-table loader reads it as a split: images in order, one caption each
    split = load_pairs_table(out / "captions.jsonl", out, "train")
    assert split.captions == captions
    loaded = load_images_tensor([out / p for p in split.image_paths], 8)
    assert torch.equal(loaded, pixels)  # in-range pixels survive PNG exactly
    # everything else back through load_export
    back, back_captions, info = load_export(out)
    assert back_captions == captions and info["method"] == "lors" and info["lrs"] == pytest.approx(syn.lr_values())
    assert torch.allclose(back.images, syn.images, atol=1e-5)
    assert torch.equal(back.texts, syn.texts)
    with torch.no_grad():
        assert torch.allclose(back.similarity_matrix(), syn.similarity_matrix())
    assert not list(tmp_path.glob(".export.*"))  # no temp dir left behind


def test_export_refuses_non_empty_target_and_bad_source(saved_set, tmp_path, capsys):
    src, *_ = saved_set
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert export_command([str(src), str(target)]) == 2
    assert "not empty" in capsys.readouterr().err and (target / "keep.txt").read_text() == "mine"
    assert export_command([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no synthetic set" in capsys.readouterr().err
    (src / "captions.json").write_text(json.dumps(["only one"]))
    assert export_command([str(src), str(tmp_path / "y")]) == 2
    assert "one caption per pair" in capsys.readouterr().err


def test_export_of_a_phased_set_writes_every_phase(saved_set, tmp_path, capsys):
    """A PTM-ST set keeps its earlier phases in phase_<i>/: the export carries each as an export of its own, listed
    in export.json, so nobody exports half a set."""
    src, syn, _, _ = saved_set
    g = torch.Generator().manual_seed(1)
    first = SyntheticSet(normalize(torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8), MEAN, STD),
                         torch.randn(4, 12, generator=g), {"image": 0.3, "text": 0.4}, None)
    first.save(src / "phase_0", {"method": "ptm_st", "budget": 5, "mean": MEAN, "std": STD, "text_encoder": "enc"},
               [f"phase zero {i}" for i in range(4)])
    manifest = json.loads((src / "manifest.json").read_text())
    (src / "manifest.json").write_text(json.dumps({**manifest, "earlier_phases": ["phase_0"]}))

    assert export_command([str(src), str(tmp_path / "export")]) == 0
    assert "phase_0" in capsys.readouterr().out
    out = tmp_path / "export"
    last, _, info = load_export(out)
    assert info["earlier_phases"] == ["phase_0"] and torch.equal(last.texts, syn.texts)
    back, captions, phase_info = load_export(out / "phase_0")
    assert captions == [f"phase zero {i}" for i in range(4)] and "earlier_phases" not in phase_info
    assert torch.equal(back.texts, first.texts) and phase_info["lrs"] == pytest.approx({"image": 0.3, "text": 0.4})
    assert torch.equal(back.similarity_matrix(), torch.eye(4))

    # a missing phase is refused before anything is written
    import shutil
    shutil.rmtree(src / "phase_0")
    assert export_command([str(src), str(tmp_path / "again")]) == 2
    assert "phase_0/ that is missing" in capsys.readouterr().err and not (tmp_path / "again").exists()
    assert not list(tmp_path.glob(".again.*")) and not list(tmp_path.glob(".export.*"))
