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
from mmdd.identity import distill_identity, teacher_hash
from mmdd.utils.io import stable_hash

# overrides -> (store directory name, store config hash, distillation identity hash)
PINNED = {
    'default': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', 'b56a2b1abcbf'),
    'method=tesla_vl': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '781ba00c54d4'),
    'method=lors': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '7d2b7990666d'),
    'method=dm': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', 'c8500082fafc'),
    'method=mdm': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '61c8f0b58bbc'),
    'method=pds': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '6da3a900d64b'),
    # ptm_st: 33e8bc1a40b1 -> 8bffac49e824 on purpose (issue 29): its CPU default averages with bias correction
    'method=ptm_st': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '8bffac49e824'),
    'method=repblend': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', 'a892eafc4283'),
    'method=random': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '52d02fa31d69'),
    'method=herding': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '645137a22884'),
    'method=kcenter': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '8153e69de70b'),
    'method=forgetting': ('convnet_minilm_5x4_s0_966eac3d', 'c697f458a581', '4870efa74b76'),
    'model=convnet_heads': ('convnet_heads_5x4_s0_5a9dd7dc', '72d92eb0ba3b', '73ce4849deba'),
    'teacher=paper': ('convnet_minilm_20x10_s0_5032f1dc', 'a2fa30c3950f', '332dbeb02645'),
    'data=flickr30k model=nfnet_bert': ('nfnet_bert_5x4_s0_321cd902', '9e017a9e6e34', '107cea263ecb'),
    'experiment=synscenes_repblend': ('convnet_heads_5x4_s0_5a9dd7dc', '72d92eb0ba3b', '314846ba1239'),
    'experiment=paper/lors_coco_100': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '4dda322049a0'),
    'experiment=paper/lors_coco_200': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '702f36fbced1'),
    'experiment=paper/lors_coco_500': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', 'e43fa6b0cd3c'),
    'experiment=paper/lors_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'a3d533159ddb'),
    'experiment=paper/lors_flickr_200': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'a1a8709da575'),
    'experiment=paper/lors_flickr_500': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'c727e28feb5a'),
    'experiment=paper/mtt_vl_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', '6129fdf68c9f'),
    'experiment=paper/ptm_st_flickr_100': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'e30da5138411'),
    'experiment=paper/ptm_st_flickr_200': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', 'aa15a9209847'),
    'experiment=paper/ptm_st_flickr_500': ('nfnet_bert_20x10_s0_cd81d406', '5e0260ea1802', '623e0557727f'),
    'experiment=paper/ptm_st_coco_100': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '1ee06969206b'),
    'experiment=paper/ptm_st_coco_200': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '92624ff3e5cd'),
    'experiment=paper/ptm_st_coco_500': ('nfnet_bert_20x10_s0_7fe4bce9', 'bef6b94bb961', '7c69b1ee5683'),
    'experiment=paper/repblend_coco_100': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', '2038bae2f7cf'),
    'experiment=paper/repblend_coco_200': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', '571a452bfb27'),
    'experiment=paper/repblend_coco_500': ('nfnet_bert_heads_20x10_s0_68f60fae', '09070b02a0d9', '81a91c33ac6f'),
    'experiment=paper/repblend_flickr_100': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '0e2a16a81456'),
    'experiment=paper/repblend_flickr_200': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '438e8b2bcedb'),
    'experiment=paper/repblend_flickr_500': ('nfnet_bert_heads_20x10_s0_32cd4720', 'a2cbd0115180', '07fe6ed45a5e'),
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
                         for p in (conf_dir() / "experiment").rglob("*.yaml") if not p.stem.startswith("_"))
    assert [e for e in experiments if f"experiment={e}" not in PINNED] == []


def test_every_method_is_pinned():
    methods = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml") if not p.stem.startswith("_"))
    assert [m for m in methods if m != "mtt_vl" and f"method={m}" not in PINNED] == []  # mtt_vl: 'default'


def test_every_moved_class_exists_where_it_now_lives():
    """FIRST_CLASS_PATHS names moved classes by their first path; its keys must be where the classes are today (a
    typo there would hash a config under a path nothing can instantiate)."""
    from hydra.utils import get_class

    from mmdd.utils.config import FIRST_CLASS_PATHS

    for now, first in FIRST_CLASS_PATHS.items():
        assert get_class(now).__name__ == first.rsplit(".", 1)[1]
