"""A store, a set and a result know what made them: mismatches are refused, naming the keys and both values."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmdd.errors import ArtifactError, MmddError
from mmdd.models.dual_encoder import backbone_fingerprint, build_dual_encoder, frozen_backbone_fingerprint
from mmdd.paths import conf_dir
from mmdd.teachers.trajectory_store import TrajectoryStore
from mmdd.identity import data_location, teachers_identity


def cfg_for(stage, *overrides):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(stage, overrides=["paths.output_dir=/tmp/x", *overrides])


def store_made_by(root, cfg, fingerprint=None):
    names = {"image": ["w"], "text": ["v"]}
    return TrajectoryStore.create_or_open(root, dataset="synscenes", model="m", config_hash="h", param_names=names,
                                          param_shapes={"w": [2], "v": [2]}, epochs=1, teacher={},
                                          identity=teachers_identity(cfg), data_location=data_location(cfg.data),
                                          backbone_fingerprint=fingerprint)


def test_a_store_made_with_other_teacher_settings_is_refused_naming_them(tmp_path):
    made = cfg_for("buffer", "data.generate.seed=7")
    store = store_made_by(tmp_path / "s", made)
    store.check_identity(teachers_identity(made), None)  # the same settings pass
    # num_experts does not define the teachers (a store is read expert by expert); nor does how captions are embedded
    store.check_identity(teachers_identity(cfg_for("distill", "data.generate.seed=7", "teacher.num_experts=2",
                                                   "model.text.batch_size=7")), None)
    for override, says in [("teacher.lr=0.05", "teacher.lr: 0.1 -> 0.05"),
                           ("model.temperature=0.1", "model.temperature: 0.07 -> 0.1"),
                           ("data.augment.scale=[0.5,1.0]", "augment.scale: [0.7, 1.0] -> [0.5, 1.0]"),
                           ("data.preprocess.max_words=20", "data.preprocess.max_words: 30 -> 20")]:
        with pytest.raises(ArtifactError, match="made with other settings") as err:
            store.check_identity(teachers_identity(cfg_for("distill", "data.generate.seed=7", override)), None)
        assert says in str(err.value), (override, str(err.value))


def test_a_random_frozen_backbone_is_the_same_in_every_stage_and_recorded():
    cfg = cfg_for("distill", "model=convnet_heads", "model.image.checkpoint=null")
    torch.manual_seed(1)
    a = build_dual_encoder(cfg.model, 384, 32)
    torch.manual_seed(2)  # another stage's seed: the frozen backbone does not follow it
    b = build_dual_encoder(cfg.model, 384, 32)
    assert frozen_backbone_fingerprint(a) == frozen_backbone_fingerprint(b) is not None
    assert not torch.equal(a.text_head.projection.weight, b.text_head.projection.weight)  # the heads do
    other = build_dual_encoder(cfg_for("distill", "model=convnet_heads", "model.image.checkpoint=null",
                                       "model.image.init_seed=5").model, 384, 32)
    assert backbone_fingerprint(other) != backbone_fingerprint(a)
    trainable = build_dual_encoder(cfg_for("distill").model, 384, 32)
    assert frozen_backbone_fingerprint(trainable) is None
    with pytest.raises(MmddError, match="model.image.init_seed"):
        build_dual_encoder(cfg_for("distill", "model=convnet_heads", "model.image.checkpoint=null",
                                   "model.image.init_seed=null").model, 384, 32)


def test_a_store_on_another_frozen_backbone_is_refused(tmp_path):
    cfg = cfg_for("buffer", "model=convnet_heads", "model.image.checkpoint=null")
    store = store_made_by(tmp_path / "s", cfg, fingerprint="aaaa")
    store.check_identity(teachers_identity(cfg), "aaaa")
    with pytest.raises(ArtifactError, match="fingerprint aaaa, but this run's frozen backbone is bbbb"):
        store.check_identity(teachers_identity(cfg), "bbbb")


def test_a_set_is_evaluated_on_its_own_data_unless_asked_and_recorded(tmp_path):
    from mmdd.stages.evaluate import check_frozen_backbone, other_dataset
    from mmdd.identity import data_identity

    made = cfg_for("distill", "data.generate.num_train=64")
    manifest = {"dataset": "synscenes", "identity": {"data": data_identity(made.data)},
                "backbone_fingerprint": "aaaa"}
    assert other_dataset(manifest, cfg_for("evaluate", "data.generate.num_train=64"), tmp_path) is None
    with pytest.raises(ArtifactError, match=r"other data .*data.generate.num_train: 64 -> 5000.*allow_other_dataset=true"):
        other_dataset(manifest, cfg_for("evaluate"), tmp_path)
    assert other_dataset(manifest, cfg_for("evaluate", "allow_other_dataset=true"), tmp_path) == [
        "data.generate.num_train: 64 -> 5000"]
    heads = build_dual_encoder(cfg_for("evaluate", "model=convnet_heads", "model.image.checkpoint=null").model, 384, 32)
    with pytest.raises(ArtifactError, match="fingerprint aaaa"):
        check_frozen_backbone(manifest, heads, tmp_path)
    check_frozen_backbone({**manifest, "backbone_fingerprint": frozen_backbone_fingerprint(heads)}, heads, tmp_path)
