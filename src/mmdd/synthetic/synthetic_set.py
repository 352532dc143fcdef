"""The synthetic set: learned images, text embeddings and per-modality step sizes.

On disk (a directory, loadable without mmdd):
    synthetic.safetensors  images [N,3,H,W] (normalised), texts [N,D], lr_image, lr_text
    manifest.json          method, budget, image/text shapes, normalisation, text encoder, config hash
    captions.json          nearest real training caption of each synthetic text
    grid.png               the images as a grid (denormalised)
Files are written atomically; the manifest last, so a directory with a manifest is complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmdd.errors import ArtifactError
from mmdd.utils.io import atomic_write, atomic_write_json, read_manifest

log = logging.getLogger(__name__)

FORMAT = "mmdd-synthetic-set"
VERSION = 1


class SyntheticSet(nn.Module):
    def __init__(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        lrs: dict[str, float | torch.Tensor],
        similarity: nn.Module | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        """`dtype`: of every learned tensor; float64 only for hardware.precision=64-true (numerical checks: a float64
        set must not pass through float32 on its way in)."""
        super().__init__()
        if images.shape[0] != texts.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {texts.shape[0]} texts")
        self.images = nn.Parameter(images.detach().clone().to(dtype))
        self.texts = nn.Parameter(texts.detach().clone().to(dtype))
        self.lrs = nn.ParameterDict(
            {m: nn.Parameter(torch.tensor(float(v), dtype=dtype)) for m, v in lrs.items()}
        )
        # Learned image-text similarity (LoRS); None means the pairs are the only positives (S = I).
        self.similarity = similarity

    def similarity_matrix(self, idx: torch.Tensor | None = None) -> torch.Tensor | None:
        return None if self.similarity is None else self.similarity.matrix(idx)

    def __len__(self) -> int:
        return self.images.shape[0]

    def lr_values(self) -> dict[str, float]:
        return {m: float(p.detach()) for m, p in self.lrs.items()}

    @torch.no_grad()
    def clamp_lrs_(self, minimum: float | None) -> None:
        """Keep the learned step sizes >= minimum after an outer step: a non-positive one stops students.
        None: no clamp (what the reference code does)."""
        if minimum is None:
            return
        for p in self.lrs.values():
            p.clamp_(min=minimum)

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | Path, manifest: dict, captions: list[str] | None = None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.detach().cpu().contiguous(), "texts": self.texts.detach().cpu().contiguous()}
        for m, p in self.lrs.items():
            tensors[f"lr_{m}"] = p.detach().cpu().reshape(1)
        if self.similarity is not None:
            for name, p in self.similarity.named_parameters():
                tensors[f"sim_{name}"] = p.detach().cpu().contiguous()
        atomic_write(d / "synthetic.safetensors", lambda p: save_file(tensors, str(p)))
        if captions is not None:
            atomic_write_json(d / "captions.json", captions)
        full = {
            "format": FORMAT,
            "version": VERSION,
            "num_pairs": len(self),
            "image_shape": list(self.images.shape[1:]),
            "text_dim": int(self.texts.shape[1]),
            "lrs": self.lr_values(),
            "similarity": None if self.similarity is None else self.similarity.spec(),
            **manifest,
        }
        atomic_write_json(d / "manifest.json", full)
        return d

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple["SyntheticSet", dict]:
        d = Path(directory)
        again = "distill the set again (`mmdd distill`), or pass synthetic=<another set directory>"
        manifest = read_manifest(d, FORMAT, "synthetic set", "pass synthetic=<dir written by mmdd distill>")
        tpath = d / "synthetic.safetensors"
        if not tpath.is_file():
            raise ArtifactError(f"{tpath} is missing (the set's tensors; manifest.json alone is not a set); {again}")
        try:
            t = load_file(str(tpath))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{tpath} is missing or corrupted ({exc}), e.g. truncated by an interrupted copy; "
                                f"{again}") from exc
        for key, value in check_tensors(t, manifest, tpath, again).items():
            manifest.setdefault(key, value)
        lrs = {k[3:]: t[k] for k in t if k.startswith("lr_")}
        similarity = None
        if manifest.get("similarity"):
            from mmdd.synthetic.similarity import build_similarity

            similarity = build_similarity(manifest["similarity"], t["images"].shape[0]).to(dtype)
            try:
                similarity.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sim_")})
            except RuntimeError as exc:
                raise ArtifactError(f"{d}: similarity parameters do not match the manifest: {exc}") from exc
        syn = cls(t["images"], t["texts"], lrs, similarity, dtype=dtype)
        return syn, manifest


def check_synthetic_compatible(manifest: dict, text_encoder: str, image_size: int, text_dim: int, where) -> None:
    """A saved set (its manifest) fits this run's text encoder (model.text.name_or_path, giving `text_dim`-d
    embeddings) and image size (data.image_size): evaluation, init_from."""
    if manifest.get("complete") is False:
        log.warning("synthetic set %s is an intermediate checkpoint (iteration %s)", where, manifest.get("iteration"))
    if int(manifest["text_dim"]) != text_dim:
        raise ArtifactError(
            f"synthetic set {where} holds {manifest['text_dim']}-d text embeddings "
            f"({manifest.get('text_encoder')}), but model.text={text_encoder} gives {text_dim}-d; "
            "evaluate with the text encoder the set was distilled with"
            + (f" (model.text.name_or_path={manifest['text_encoder']})" if manifest.get("text_encoder") else "")
        )
    if manifest.get("text_encoder") not in (None, str(text_encoder)):
        raise ArtifactError(
            f"synthetic set {where} was distilled with text encoder {manifest['text_encoder']!r}, "
            f"not {str(text_encoder)!r}; set model.text.name_or_path accordingly"
        )
    if list(manifest["image_shape"])[1:] != [int(image_size)] * 2:
        raise ArtifactError(
            f"synthetic set {where} has images of shape {manifest['image_shape']} but data.image_size="
            f"{image_size}; evaluate at the resolution it was distilled at"
        )


def check_tensors(t: dict[str, torch.Tensor], manifest: dict, path: Path, fix: str) -> dict:
    """The tensors a set needs are in its file, with the shapes its manifest states; returns those shapes."""
    for key in ("images", "texts", "lr_image", "lr_text"):
        if key not in t:
            raise ArtifactError(f"{path} lacks the tensor {key!r} (it holds {sorted(t)}); {fix}")
    images, texts = t["images"], t["texts"]
    if images.dim() != 4 or texts.dim() != 2 or images.shape[0] != texts.shape[0]:
        raise ArtifactError(f"{path}: images {list(images.shape)} and texts {list(texts.shape)} are not N pairs of "
                            f"[N,3,H,W] images and [N,D] texts; {fix}")
    stated = {"num_pairs": images.shape[0], "image_shape": list(images.shape[1:]), "text_dim": texts.shape[1]}
    for key, actual in stated.items():
        if key in manifest and manifest[key] != actual:
            raise ArtifactError(f"{path} holds {key}={actual}, but manifest.json beside it says {manifest[key]}: the "
                                f"two files come from different sets; {fix}")
    return stated


def load_captions(directory: str | Path) -> list[str] | None:
    p = Path(directory) / "captions.json"
    return json.loads(p.read_text()) if p.exists() else None


@torch.no_grad()
def nearest_captions(texts: torch.Tensor, train_emb: torch.Tensor, captions: list[str], chunk: int = 4096) -> list[str]:
    """Nearest real caption (cosine) of each synthetic text embedding: what the text 'says'."""
    q = torch.nn.functional.normalize(texts.detach().float().cpu(), dim=-1)
    best_val = torch.full((q.shape[0],), -2.0)
    best_idx = torch.zeros(q.shape[0], dtype=torch.long)
    for s in range(0, train_emb.shape[0], chunk):
        k = torch.nn.functional.normalize(train_emb[s : s + chunk].float(), dim=-1)
        v, i = (q @ k.t()).max(1)
        better = v > best_val
        best_val[better] = v[better]
        best_idx[better] = i[better] + s
    return [captions[i] for i in best_idx.tolist()]


def save_grid(images: torch.Tensor, mean, std, path: str | Path, nrow: int | None = None) -> Path:
    """Denormalised images as one PNG grid."""
    import math

    from PIL import Image
    from torchvision.utils import make_grid

    from mmdd.data.transforms import denormalize

    x = denormalize(images.detach().float().cpu(), mean, std)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return atomic_write(path, lambda p: Image.fromarray(arr).save(p, format="PNG"))
