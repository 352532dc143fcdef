"""The identities that name trajectory stores and decide what a checkpoint may resume into, pinned.

A refactor of the configs (`_target_` keys, typed schemas, moved classes) must not change them by accident: a new
store id sends every user's default `buffer_dir` to an empty directory (teachers trained again), and a new
distillation identity refuses every existing checkpoint. Change a value here only on purpose, and say so in the
change. The synthetic data's content fingerprint (which needs the data on disk) is held fixed; everything else comes
from the composed config alone, so the values are the same on every machine.
"""

from pathlib import Path
from unittest import mock

import pytest
from hydra import compose, initialize_config_dir

from mmdd.paths import conf_dir
from mmdd.utils.config import distill_identity, teacher_hash
from mmdd.utils.io import stable_hash

# overrides -> (store directory name, store config hash, distillation identity hash)
PINNED = {
    'default': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', 'b56a2b1abcbf'),
    'method=tesla_vl': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '781ba00c54d4'),
    'method=lors': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '7d2b7990666d'),
    'model=convnet_heads': ('convnet_heads_5x4_s0_5a9dd7dc', '72d92eb0ba3b', '73ce4849deba'),
    'teacher=paper': ('convnet_minilm_20x10_s0_5032f1dc', 'a2fa30c3950f', '332dbeb02645'),
    'data=flickr30k model=nfnet_bert': ('nfnet_bert_5x4_s0_321cd902', '9e017a9e6e34', '107cea263ecb'),
    'experiment=synscenes_repblend': ('convnet_heads_5x4_s0_5a9dd7dc', '72d92eb0ba3b', '314846ba1239'),
    'experiment=paper/lors_coco_100': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '47c6b05edc80'),
    'experiment=paper/lors_coco_200': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', 'aa6514355f88'),
    'experiment=paper/lors_coco_500': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '5521181178f8'),
    'experiment=paper/lors_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'c01b99d89e6d'),
    'experiment=paper/lors_flickr_200': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', '0b87bd3a6779'),
    'experiment=paper/lors_flickr_500': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'd82ea5178968'),
    'experiment=paper/mtt_vl_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'ba1108ee96e9'),
    'experiment=paper/ptm_st_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', '2f02a13d8c93'),
    'experiment=paper/ptm_st_flickr_200': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'f951b28de439'),
    'experiment=paper/ptm_st_flickr_500': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'f9d5d776642f'),
    'experiment=paper/ptm_st_coco_100': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', 'fb482666e358'),
    'experiment=paper/ptm_st_coco_200': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', 'defb31dd17e3'),
    'experiment=paper/ptm_st_coco_500': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '52de530b802d'),
    'experiment=paper/repblend_coco_100': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', '63f35e18c11c'),
    'experiment=paper/repblend_coco_200': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', 'a952c584df39'),
    'experiment=paper/repblend_coco_500': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', 'ad0d41399a99'),
    'experiment=paper/repblend_flickr_100': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '3f906dd6c678'),
    'experiment=paper/repblend_flickr_200': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '3cd8aa371f68'),
    'experiment=paper/repblend_flickr_500': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '6a0b823aaa26'),
}


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        yield lambda overrides: compose("distill", overrides=["paths.output_dir=/tmp/x", *overrides])


@pytest.mark.parametrize("case", list(PINNED))
def test_identities_do_not_change(composed, case):
    cfg = composed([] if case == "default" else case.split())
    with mock.patch("mmdd.data.synscenes.synscenes_fingerprint", lambda root: "fixed"):
        got = (Path(str(cfg.buffer_dir)).name, teacher_hash(cfg), stable_hash(distill_identity(cfg)))
    assert got == PINNED[case]


def test_every_experiment_is_pinned():
    experiments = sorted(p.relative_to(conf_dir() / "experiment").with_suffix("").as_posix()
                         for p in (conf_dir() / "experiment").rglob("*.yaml"))
    assert [e for e in experiments if f"experiment={e}" not in PINNED] == []
