"""The data pipeline against the official loaders: `python experiments/parity/data_pipeline.py --official <LoRS_Distill>`.

The official dataset classes and transforms (LoRS `data/__init__.py` create_dataset, `data/flickr30k_dataset.py`,
`data/randaugment.py`; MTT-VL's and RepBlend's are the same files) are imported from the checkout and run on the
parity run's data (the embedded dataset in the BLIP Flickr30K layout, written by run.py), against mmdd's paper data
path, `data=flickr30k` pointed at the same files (config overrides only). Compared:

- captions: the official `pre_caption(caption, 30)` of every train/test caption against mmdd's (data.preprocess);
- caption embeddings: the official run's cached BERT embeddings (`textprocess` / `textprocess_train`, written by
  run.py's official LoRS run into its working directory) against mmdd's (`mmdd.data.text_cache`), same stand-in BERT;
- test images: the official `transform_test` (Resize((s, s), bicubic), ToTensor, Normalize) of every test image
  against mmdd's decoded and normalised test images; the same for the train images (mmdd's `init: real` pixels);
- the training augmentation, part by part: RandomResizedCrop's box (torchvision's get_params and mmdd's crop_box on
  one torch seed), and each RandomAugment operation at the papers' magnitude 5 (the official numpy/OpenCV function
  and mmdd's, same sign) on every train image. The draws themselves come from other generators (the official:
  torch's global RNG for the crop and flip, numpy's for RandomAugment; mmdd: one torch generator), so whole augmented
  batches are not compared: the parts are, under the same parameters.

Prints the table rows and writes <work>/parity_data.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import git_commit, on_lors_run, relative  # noqa: E402  (the harness's own shared inputs)


def mmdd_data(work: Path, inputs: dict, image_size: int):
    """mmdd's paper data path on the parity files: data=flickr30k with its root, annotations and images overridden."""
    from hydra import compose, initialize_config_dir

    from mmdd.data.splits import load_data
    from mmdd.paths import conf_dir

    overrides = [f"paths.root_dir={work / 'mmdd'}", "data=flickr30k", f"data.root={work / 'mmdd'}",
                 f"data.ann_dir={inputs['ann_root']}", f"data.image_root={inputs['image_root']}",
                 f"data.image_size={image_size}", "model=nfnet_bert", "model.image.pretrained=false",
                 f"model.text.name_or_path={work / 'standin'}",
                 "model.text.device=cpu", "hardware=cpu", "logger=none"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=overrides)
    return cfg, load_data(cfg, splits=("train", "test"))


def official_modules(official: Path):
    """The checkout's data modules (its data/__init__.py imports src.networks: the harness's stubs cover clip/kornia)."""
    from official import patch_tokenizer, stub_missing

    stub_missing(["clip", "kornia", "sklearn.metrics.pairwise"])
    patch_tokenizer()
    sys.path.insert(0, str(official))
    import data as official_data
    import data.flickr30k_dataset as flickr
    import data.randaugment as randaugment

    return official_data, flickr, randaugment


def compare_captions(flickr, inputs: dict, data) -> dict:
    out = {}
    for split in ("train", "test"):
        raw = json.loads((Path(inputs["ann_root"]) / f"flickr30k_{split}.json").read_text())
        theirs = [flickr.pre_caption(c, 30) for a in raw for c in ([a["caption"]] if split == "train" else a["caption"])]
        ours = list(data[split].split.captions)
        differ = sum(a != b for a, b in zip(theirs, ours)) + abs(len(theirs) - len(ours))
        out[split] = {"captions": len(theirs), "differ": differ}
    return out


def compare_embeddings(work: Path, data) -> dict:
    cwd = work / "official" / "cwd"
    out = {}
    for split, name in (("train", "flickr_bert_train_text_embed.npz"), ("test", "flickr_bert_text_embed.npz")):
        path = cwd / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `run.py lors --official <LoRS_Distill>` first (its official run "
                             "writes the caption embeddings)")
        theirs = torch.from_numpy(np.load(path)["bert_test_embed"]).float()
        ours = data[split].text_emb.float()
        out[split] = {"relative": relative(ours, theirs), "shape": list(theirs.shape)}
    return out


def compare_images(official_data, inputs: dict, data, cfg, image_size: int) -> dict:
    from mmdd.data.transforms import normalize

    args = SimpleNamespace(image_size=image_size, no_aug=False, dataset="flickr",
                           image_root=str(inputs["image_root"]) + "/", ann_root=str(inputs["ann_root"]))
    train, _, test = official_data.create_dataset(args)
    out = {}
    for split, dataset, paths in (("test", test, None), ("train", train, data["train"].split.image_paths)):
        ours = normalize(data[split].image_batch(range(data[split].num_images)), cfg.data.mean, cfg.data.std)
        if split == "test":
            theirs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        else:  # the train images through the official transform_test (the un-augmented pixels)
            from PIL import Image
            theirs = torch.stack([test.transform(Image.open(p).convert("RGB")) for p in paths])
        diff = (ours - theirs).abs()
        out[split] = {"images": len(theirs), "relative": relative(ours, theirs),
                      "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    return out


def compare_crop_boxes(trials: int = 200) -> dict:
    from torchvision.transforms import RandomResizedCrop

    from mmdd.data.sample_augment import crop_box

    scale, ratio = (0.5, 1.0), (3 / 4, 4 / 3)
    differ = 0
    for seed in range(trials):
        width, height = 200 + 7 * seed % 300, 150 + 13 * seed % 250
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(torch.zeros(3, height, width), scale, ratio)
        ours = crop_box(width, height, scale, ratio, torch.Generator().manual_seed(seed))
        differ += ours != (left, top, w, h)
    return {"trials": trials, "differ": differ}


def compare_randaugment(randaugment, data) -> dict:
    """Each operation of the papers' list at magnitude 5, with a fixed sign, on every train image (uint8)."""
    from mmdd.data import randaugment as ours

    level = 5
    images = data["train"].image_batch(range(data["train"].num_images))
    out = {}
    uniform = np.random.random
    try:
        _each_operation(randaugment, ours, level, images, out)
    finally:
        np.random.random = uniform
    return out


def _each_operation(randaugment, ours, level, images, out) -> None:
    for name in ours.BLIP_OPS:
        for negative in ((False, True) if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
                         else (False,)):
            # Both draw the sign from a uniform number: negative when it is > 0.5 (Rotate: < 0.5). A fixed number
            # gives both the same sign: the official rule reads numpy's np.random.random, mmdd's its `rand`.
            u = (0.0 if negative else 1.0) if name == "Rotate" else (1.0 if negative else 0.0)
            np.random.random = lambda u=u: u
            args = randaugment.arg_dict[name](level)
            rand = lambda u=u: u  # noqa: E731
            worst, pixels, total = 0, 0, 0
            for img in images:
                theirs = randaugment.func_dict[name](img.permute(1, 2, 0).numpy().copy(), *args)
                theirs = torch.from_numpy(np.ascontiguousarray(theirs)).permute(2, 0, 1).to(torch.int16)
                mine = ours._OPS[name](img, float(level), rand).to(torch.int16)
                d = (mine - theirs).abs()
                worst, pixels, total = max(worst, int(d.max())), pixels + int((d > 0).sum()), total + d.numel()
            out[f"{name}{'-' if negative else ''}"] = {"max_abs": worst, "pixels_differ": pixels / total}


def main() -> int:
    args, official, work, inputs = on_lors_run(__doc__, "LoRS_Distill", lambda parser: parser.add_argument(
        "--resize-to", type=int, default=None,
        help="both sides resize the images to this size (default: the files' size, no resampling)"))
    size = args.resize_to or args.image_size
    cfg, data = mmdd_data(work, inputs, size)
    official_data, flickr, randaugment = official_modules(official)
    result = {
        "official_commit": git_commit(official), "image_size": args.image_size, "resize_to": size,
        "captions": compare_captions(flickr, inputs, data),
        "embeddings": compare_embeddings(work, data),
        "images": compare_images(official_data, inputs, data, cfg, size),
        "crop_boxes": compare_crop_boxes(),
        "randaugment": compare_randaugment(randaugment, data),
        "command": " ".join(["python", "experiments/parity/data_pipeline.py", *sys.argv[1:]]),
    }
    (work / f"parity_data_{size}px.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
