"""The Hydra tree composes for every stage and group option, and real-format datasets load through it."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from mmdd.data.splits import load_annotations, load_data
from mmdd.errors import DataError
from mmdd.models.dual_encoder import build_dual_encoder
from mmdd.paths import conf_dir


def cfg_for(stage, overrides=()):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(stage, overrides=list(overrides))


@pytest.mark.parametrize("stage", ["buffer", "distill", "evaluate", "run"])
@pytest.mark.parametrize(
    "overrides",
    [[], ["data=flickr30k", "model=nfnet_bert", "teacher=paper", "hardware=gpu"], ["data=coco", "logger=csv"],
     ["method=random", "logger=none"], ["data=pairs_table", "data.root=/x"]],
)
def test_every_stage_composes(stage, overrides):
    cfg = cfg_for(stage, ["paths.output_dir=/tmp/x", *overrides])
    assert cfg.stage == stage
    for group in ("data", "model", "teacher", "method", "protocol", "hardware", "logger", "paths"):
        assert group in cfg
    assert cfg.method._target_.startswith("mmdd.methods.")


def test_papers_model_builds_with_nfnet_and_768d_text():
    cfg = cfg_for("distill", ["model=nfnet_bert", "model.image.pretrained=false"])
    model = build_dual_encoder(cfg.model, text_dim=768, image_size=64)
    assert model.text_head.projection.in_features == 768 and model.embed_dim == 2304
    logits = model(torch.randn(2, 3, 64, 64), torch.randn(2, 768))
    assert logits.shape == (2, 2)
    assert (logits.abs() <= 1 / 0.07 + 1e-4).all()  # cosine / T


def test_heads_only_mode_freezes_backbone():
    cfg = cfg_for("distill", ["model.image_head=true", "model.trainable=heads"])
    model = build_dual_encoder(cfg.model, text_dim=384, image_size=32)
    names = model.modality_parameter_names()
    assert names["image"] and all(n.startswith("image_head.") for n in names["image"])
    assert not any(p.requires_grad for p in model.backbone.parameters())


def _write_flickr_like(root, n_train=4, n_test=3):
    (root / "flickr30k-images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(n_train + 2 * n_test):
        Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(root / "flickr30k-images" / f"{i}.jpg")
    train = [{"image": f"flickr30k-images/{i}.jpg", "caption": f"A photo number {i}, caption {k}.", "image_id": i}
             for i in range(n_train) for k in range(2)]
    val = [{"image": f"flickr30k-images/{n_train + i}.jpg", "caption": [f"val {i} {k}" for k in range(5)]} for i in range(n_test)]
    test = [{"image": f"flickr30k-images/{n_train + n_test + i}.jpg", "caption": [f"test {i} {k}" for k in range(5)]}
            for i in range(n_test)]
    for name, obj in (("flickr30k_train.json", train), ("flickr30k_val.json", val), ("flickr30k_test.json", test)):
        (root / "annotations" / name).write_text(json.dumps(obj))


def test_flickr30k_config_loads_blip_files(tmp_path):
    _write_flickr_like(tmp_path / "f30k")
    cfg = cfg_for("distill", ["data=flickr30k", f"data.root={tmp_path / 'f30k'}", "data.image_size=32",
                              f"paths.root_dir={tmp_path}", "paths.output_dir=/tmp/x"])
    splits = load_annotations(cfg.data)
    assert splits["train"].num_images == 4 and splits["train"].num_captions == 8
    assert splits["test"].num_captions == 15
    data = load_data(cfg, splits=("test",))
    assert data["test"].image_batch([0, 1]).shape == (2, 3, 32, 32)  # lazy loading, resized + cropped
    assert data["test"].text_emb.shape == (15, 384)


def test_flickr30k_missing_annotations_named(tmp_path):
    cfg = cfg_for("distill", ["data=flickr30k", f"data.root={tmp_path / 'nothing'}", "paths.output_dir=/tmp/x"])
    with pytest.raises(DataError, match=r"flickr30k_train.json does not exist.*BLIP repository"):
        load_annotations(cfg.data)


PAPER = ["mtt_vl_flickr_100"] + [f"{m}_{d}_{b}" for m in ("lors", "repblend") for d in ("flickr", "coco") for b in (100, 200, 500)]


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiments_compose(name):
    cfg = cfg_for("distill", [f"experiment=paper/{name}", "paths.output_dir=/tmp/x"])
    assert cfg.method.syn_steps == 8 and cfg.method.expert_epochs == 1 and cfg.method.lr_lr == 0.01
    assert cfg.method.lr_init == 0.1 and cfg.teacher.num_experts == 20 and cfg.teacher.epochs == 10
    assert cfg.model.image.name == "nfnet_l0" and cfg.model.text.name_or_path == "bert-base-uncased"
    assert cfg.budget == int(name.rsplit("_", 1)[1])
    if name.startswith("repblend"):
        assert cfg.method.batch_syn == 20 and cfg.method.blend.alpha == 1.0 and cfg.model.trainable == "heads"
        assert cfg.protocol.name == "repblend"


def test_coco_500s_temperature_and_no_aug_are_the_distillations_only():
    """(Every paper setting is checked against the reference scripts in tests/test_paper_settings.py.)"""
    for name in ("lors_coco_500", "repblend_coco_500"):
        cfg = cfg_for("buffer", [f"experiment=paper/{name}", "paths.output_dir=/tmp/x"])
        assert cfg.model.temperature == 0.07 and cfg.data.augment.enabled is True and cfg.teacher.augment is True
        assert cfg.method.temperature == 0.1


@pytest.mark.parametrize("override, field, says", [
    ("protocol.epochs=abc", "protocol.epochs", "could not be converted to Integer"),
    ("teacher.lr=fast", "teacher.lr", "could not be converted to Float"),
    ("hardware.compile=maybe", "hardware.compile", "is not a valid bool"),
    ("hardware.devicez=2", "hardware.devicez", "not in 'HardwareConfig'"),
    ("protocol.num_seed=2", "protocol.num_seed", "not in 'ProtocolConfig'"),
])
def test_typed_groups_refuse_wrong_types_and_unknown_keys_when_composing(override, field, says):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        cfg_for("distill", ["paths.output_dir=/tmp/x", override])
    text = f"{err.value} {err.value.__cause__}"
    assert field in text and says in text


@pytest.mark.parametrize("group", ["hardware", "protocol", "teacher"])
def test_every_file_of_a_typed_group_fills_its_schema(group):
    from omegaconf import OmegaConf

    from mmdd.config_schema import SCHEMAS

    for f in sorted(p for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_")):
        cfg = cfg_for("distill", ["paths.output_dir=/tmp/x", f"{group}={f.stem}"])
        node = cfg[group]
        assert OmegaConf.get_type(node) is SCHEMAS[group], f
        assert not OmegaConf.missing_keys(node), (f, OmegaConf.missing_keys(node))


def test_default_store_names_tell_data_model_and_teacher_variants_apart():
    """A 64 px run, other split sizes or another model must not find the 32 px store (and be refused by it)."""
    def store(*overrides):
        return cfg_for("distill", ["paths.output_dir=/tmp/x", *overrides]).buffer_dir

    base = store()
    variants = [store("data.image_size=64"), store("data.generate.num_train=100"), store("model.image.width=64"),
                store("teacher.lr=0.05"), store("data.preprocess.max_words=20")]
    assert len({base, *variants}) == 1 + len(variants)
    # what does not define the teachers keeps the store: distillation seed, method, budget
    assert store("seed=3", "method=tesla_vl", "budget=50") == base


@pytest.mark.parametrize("stage", ["buffer", "distill", "evaluate", "run"])
def test_debug_tiny_is_the_tests_tiny_run(stage):
    """`debug=tiny` (conf/debug/tiny.yaml) composes the config the tests' TINY overrides do: one source for both."""
    from omegaconf import OmegaConf

    from conftest import debug_overrides

    by_group = cfg_for(stage, ["paths.output_dir=/tmp/x", "debug=tiny"])
    by_overrides = cfg_for(stage, ["paths.output_dir=/tmp/x", *debug_overrides("tiny")])
    assert OmegaConf.to_container(by_group) == OmegaConf.to_container(by_overrides)
    assert by_group.teacher.num_experts == 2 and by_group.budget == 8


MODEL_CONFIGS = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_builds_and_scores_a_batch(name):
    """Every conf/model/*.yaml composes, builds offline (no pretrained weights fetched) and scores image-caption
    pairs: the models the paper configs name are checked without a GPU or a download."""
    # a backbone from `mmdd pretrain` (convnet_heads) is drawn at random here: its loading is tested with the stage
    cfg = cfg_for("distill", [f"model={name}", "model.image.pretrained=false", "model.image.checkpoint=null",
                              "paths.output_dir=/tmp/x"])
    text_dim = 768 if "bert" in name else 384
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, text_dim=text_dim, image_size=32)
    names = model.modality_parameter_names()
    assert names["image"] and names["text"]  # both modalities have parameters the distillation matches
    logits = model(torch.randn(3, 3, 32, 32), torch.randn(3, text_dim))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


SWEEPS = sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_searches_existing_settings_around_their_defaults(sweep):
    """Each conf/sweep/<name>.yaml composes, selects val (test never read), and every searched setting exists in the
    composed config with its default inside the searched range or among the choices (the search is centred on what
    the method runs by default, not somewhere else)."""
    import re

    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=["paths.output_dir=/tmp/x", f"sweep={sweep}"], return_hydra_config=True)
    assert cfg.protocol.selection == "val" and cfg.evaluate
    params = cfg.hydra.sweeper.params
    assert params, sweep
    for key, spec in params.items():
        default = OmegaConf.select(cfg, key, default="<missing>")
        assert default != "<missing>", (sweep, key)
        if key == "method.temperature" and default is None:  # null: the model's temperature
            default = cfg.model.temperature
        spec = str(spec)
        if "interval" in spec:
            lo, hi = map(float, re.search(r"interval\(([^,]+),([^)]+)\)", spec).groups())
            assert default is not None and lo <= float(default) <= hi, (sweep, key, default, spec)
        else:
            choices = [c.strip() for c in re.search(r"choice\((.*)\)", spec).group(1).split(",")]
            assert str(default) in choices or float(default) in [float(c) for c in choices], (sweep, key, default)
