"""`mmdd export`: a synthetic set as a plain dataset other code can read.

    <out>/images/00000.png ...     the images, de-normalised and clipped to [0, 255]
    <out>/captions.jsonl           {"image": "images/00000.png", "caption": <nearest real caption>, "index": i}
    <out>/tensors.safetensors      texts [N, D] (the learned embeddings: a caption only approximates them),
                                   images [N, 3, H, W] (exact, normalised with mean/std below),
                                   similarity [N, N] (the learned S, or I for a set without one)
    <out>/export.json              what it is: source set, text encoder, mean/std, step sizes, file list
    <out>/phase_<i>/               a phased set's earlier phases (PTM-ST), each an export as above, listed in
                                   export.json's earlier_phases: students train on them in order, then on <out>

captions.jsonl is the `pairs_table` format, so `data=pairs_table data.root=<out>
data.ann_files.train=captions.jsonl` reads the export back as a training split.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmdd.data.transforms import denormalize, normalize
from mmdd.errors import ArtifactError
from mmdd.synthetic.synthetic_set import SyntheticSet, load_captions

FORMAT = "mmdd.export"


def export_synthetic(synthetic: Path, out: Path) -> Path:
    """Export the set (and a phased set's earlier phases into phase_<i>/) to `out`, all or nothing."""
    synthetic, out = Path(synthetic), Path(out)
    syn, manifest = SyntheticSet.load(synthetic)
    phases = list(manifest.get("earlier_phases") or [])
    sources = []
    for name in phases:  # every phase is read before anything is written
        if not (synthetic / name / "manifest.json").exists():
            raise ArtifactError(f"{synthetic}/manifest.json lists an earlier phase {name}/ that is missing; copy the "
                                "set with its phase_<i>/ directories, or distil it again")
        sources.append((synthetic / name, *SyntheticSet.load(synthetic / name)))
    sources.append((synthetic, syn, manifest))
    if out.exists() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not empty; choose a new directory for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed in one step: an interrupted export leaves no half dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, (source, phase_set, phase_manifest) in zip([*phases, None], sources):
            target = tmp if name is None else tmp / name
            target.mkdir(exist_ok=True)
            write_export(source, phase_set, phase_manifest, target, earlier_phases=phases if name is None else [])
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_export(synthetic: Path, syn: SyntheticSet, manifest: dict, target: Path, earlier_phases: list[str]) -> None:
    """One set's images, captions, tensors and export.json into the (empty) directory `target`."""
    captions = load_captions(synthetic)
    if captions is None or len(captions) != len(syn):
        raise ArtifactError(f"{synthetic}: captions.json is missing or does not have one caption per pair; "
                            "re-save the set with mmdd distill (it writes the nearest real caption per text)")
    mean, std = manifest.get("mean"), manifest.get("std")
    if mean is None or std is None:
        raise ArtifactError(f"{synthetic}/manifest.json has no mean/std; cannot de-normalise the images")
    (target / "images").mkdir()
    pixels = denormalize(syn.images.detach(), mean, std).mul(255).round().to(torch.uint8)  # clamped to [0, 1]
    rows = []
    for i, img in enumerate(pixels):
        name = f"images/{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(target / name)
        rows.append({"image": name, "caption": captions[i], "index": i})
    (target / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with torch.no_grad():
        sim = syn.similarity_matrix()
    sim = torch.eye(len(syn)) if sim is None else sim.detach()
    save_file({"texts": syn.texts.detach().contiguous(), "images": syn.images.detach().contiguous(),
               "similarity": sim.contiguous()}, str(target / "tensors.safetensors"))
    info = {
        "format": FORMAT,
        "source": str(synthetic),
        "method": manifest.get("method"),
        "budget": manifest.get("budget"),
        "num_pairs": len(syn),
        "dataset": manifest.get("dataset"),
        "text_encoder": manifest.get("text_encoder"),
        "text_pooling": manifest.get("text_pooling"),
        "image_size": manifest.get("image_size"),
        "mean": mean,
        "std": std,
        "lrs": syn.lr_values(),
        "inner_loss": manifest.get("inner_loss"),
        "label_temperature": manifest.get("label_temperature"),
        "wbce_log_eps": manifest.get("wbce_log_eps"),
        "config_hash": manifest.get("config_hash"),
        "files": {"captions": "captions.jsonl", "images": "images/", "tensors": "tensors.safetensors"},
        "note": "captions are the nearest real training captions to the learned text embeddings; "
                "train on tensors.safetensors:texts for the set as distilled",
    }
    if earlier_phases:
        info["earlier_phases"] = earlier_phases
        info["note"] += ("; a phased set: train on the exports in earlier_phases in order (each at its own lrs and "
                         "with its own similarity), then on this one, as mmdd evaluate does")
    (target / "export.json").write_text(json.dumps(info, indent=1))


def load_export(root: Path) -> tuple[SyntheticSet, list[str], dict]:
    """An export back as a SyntheticSet (images from the PNGs, texts and S from tensors.safetensors)."""
    root = Path(root)
    info_file = root / "export.json"
    if not info_file.exists():
        raise ArtifactError(f"{root} is not an mmdd export (no export.json); write one with `mmdd export`")
    info = json.loads(info_file.read_text())
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]
    try:
        t = load_file(str(root / "tensors.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ArtifactError(f"{root / 'tensors.safetensors'} is missing or corrupted: {exc}") from exc
    pixels = np.stack([np.asarray(Image.open(root / r["image"]).convert("RGB")) for r in rows])
    images = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0, info["mean"], info["std"])
    from mmdd.synthetic.similarity import FullSimilarity

    sim = FullSimilarity(len(rows))  # the exported S as a full matrix, whatever its parametrisation was
    with torch.no_grad():
        sim.full.copy_(t["similarity"])
    syn = SyntheticSet(images, t["texts"], info["lrs"], sim)
    return syn, [r["caption"] for r in rows], info
