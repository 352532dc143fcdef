"""PDS-style prototype selection (mmdd.methods.selection.prototypes): pruning, prototypes of matched cells, its
settings, the image-generator hook."""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_process
from helpers import SMALL, method_settings
from test_clustering import blobs
from mmdd.errors import MmddError
from mmdd.methods.selection.clustering import kmeans
from mmdd.methods.selection.prototypes import match_prototypes, nearest_distinct, prune_pairs


def test_pruning_drops_the_least_agreeing_pairs():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.2]])
    assert prune_pairs(img, txt, 0.4).tolist() == [0, 2, 4]
    assert prune_pairs(img, txt, 0.0).tolist() == [0, 1, 2, 3, 4]


def test_prototypes_are_the_means_of_matched_cells():
    # two concepts, each a blob of images and a blob of captions; the two clusterings label them independently
    img, n = blobs([[0.0, 0.0], [6.0, 6.0]], n=10, seed=1)
    txt, _ = blobs([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]], n=10, seed=2)
    protos = match_prototypes(img, txt, 2, torch.Generator().manual_seed(0))
    for p_img, p_txt, cell in zip(protos.image, protos.text, protos.members):
        assert len(cell) == n and len({c // n for c in cell}) == 1  # a whole concept, image and caption together
        assert torch.allclose(p_img, img[cell].mean(0)) and torch.allclose(p_txt, txt[cell].mean(0))
    assert nearest_distinct(torch.tensor([[1.0, 0.0], [1.0, 0.01]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == [0, 1]


def test_prototypes_of_empty_clusters_are_finite():
    """Repeated rows (each image once per caption) can leave a k-means cluster empty: its prototype is its centre,
    never the NaN mean of nothing."""
    img = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # two distinct images for k = 3
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    km = kmeans(img, 3, torch.Generator().manual_seed(0), "euclidean", 10)
    assert (torch.bincount(km.labels, minlength=3) == 0).any()  # the case under test
    protos = match_prototypes(img, txt, 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(protos.image).all() and torch.isfinite(protos.text).all()
    # clustered in another space: the caption row nearest the empty cluster's centre there
    both = match_prototypes(txt, img, 3, torch.Generator().manual_seed(0), cluster_captions=img * 2)
    assert torch.isfinite(both.text).all()


def test_pds_settings_are_typed_like_every_method_s():
    from mmdd.methods.selection.prototypes import PrototypeSettings

    with pytest.raises(MmddError, match=r"method.prune_ratio must be a finite number, got 'abc'"):
        method_settings(PrototypeSettings, "pds", prune_ratio="abc")
    with pytest.raises(MmddError, match="method.metric must be one of"):
        method_settings(PrototypeSettings, "pds", metric="manhattan")
    assert method_settings(PrototypeSettings, "pds", restarts=3.0).restarts == 3  # a whole float from the command line


class FlatColourGenerator:
    """A stand-in image generator for the PDS hook (a diffusion model cannot be loaded here): prototype k becomes a
    flat image of grey level k, so the test can tell which prototype each image came from."""

    def __call__(self, prototypes, prompts, image_size):
        k = prototypes.image.shape[0]
        assert len(prompts) == k and all(isinstance(p, str) for p in prompts)
        return torch.arange(k, dtype=torch.uint8).view(k, 1, 1, 1).expand(k, 3, image_size, image_size).clone()


def test_pds_generator_hook_renders_one_image_per_prototype(root):
    from hydra import compose, initialize_config_dir

    from mmdd.data.transforms import denormalize
    from mmdd.paths import conf_dir
    from mmdd.synthetic.synthetic_set import SyntheticSet

    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1",
                    "method.generator={_target_: test_prototypes.FlatColourGenerator}",
                    "hydra.run.dir=outputs/pds_gen"], root, check=True)
    syn, _ = SyntheticSet.load(root / "outputs" / "pds_gen" / "synthetic")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        data = compose("distill", overrides=["paths.output_dir=/tmp/x"]).data
    pixels = denormalize(syn.images.detach(), list(data.mean), list(data.std)) * 255
    assert torch.allclose(pixels.flatten(1).mean(1), torch.arange(8.0), atol=0.05)  # image k is prototype k's
