"""A model's matched parameters as one flat vector per modality, and the forward pass that uses them.

Shared by the distillation methods (they unroll students on flat vectors), the diagnostics and the planner, so
it lives with the models: neither `methods` nor `evaluate` needs the other for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from mmdd.utils.profiling import scope

@dataclass
class ParamLayout:
    """Names and shapes of the matched parameters, per modality, in a fixed order."""

    names: dict[str, list[str]]
    shapes: dict[str, torch.Size]

    @classmethod
    def from_model(cls, model) -> "ParamLayout":
        named = dict(model.named_parameters())
        names = model.modality_parameter_names()
        return cls(names=names, shapes={n: named[n].shape for group in names.values() for n in group})

    def numel(self, modality: str) -> int:
        return sum(self.shapes[n].numel() for n in self.names[modality])

    def flatten(self, params: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names[modality]])

    @torch.no_grad()
    def load_into(self, model, flats: dict[str, torch.Tensor]) -> None:
        """Copy flat vectors (e.g. an expert's snapshot) into the model's matched parameters."""
        for name, value in self.unflatten({m: f.detach() for m, f in flats.items()}).items():
            model.get_parameter(name).copy_(value)

    def unflatten(self, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views of the flat vectors shaped as the model's parameters (gradients flow through)."""
        return {n: view for m, flat in flats.items() for n, view in zip(self.names[m], self.views(flat, m))}

    def views(self, flat: torch.Tensor, modality: str) -> list[torch.Tensor]:
        """A modality's flat vector as views shaped as its parameters, in the layout's order. Arithmetic on the views
        (foreach updates, gradients taken with respect to them) works on the flat vector's memory, without the
        concatenation a gradient with respect to the flat vector itself is assembled by."""
        sizes = [self.shapes[n].numel() for n in self.names[modality]]
        return [chunk.view(self.shapes[n]) for n, chunk in zip(self.names[modality], torch.split(flat, sizes))]

    def named(self, params: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The model's parameters by name from each modality's flat vector, or its list of per-parameter tensors in
        the layout's order."""
        out: dict[str, torch.Tensor] = {}
        for m, value in params.items():
            tensors = self.views(value, m) if isinstance(value, torch.Tensor) else value
            out.update(zip(self.names[m], tensors))
        return out


def functional_logits(model, layout: ParamLayout, flats: dict[str, torch.Tensor | list[torch.Tensor]], images, texts,
                      mix=None, from_features: bool = False) -> torch.Tensor:
    """Logits of `model` with its matched parameters replaced by the flat vectors, or by per-parameter tensors in the
    layout's order (ParamLayout.named); `images` may be cached backbone features, see `from_features`."""
    kwargs = {"mix": mix, "from_features": True} if from_features else {"mix": mix}
    with scope("flat"):
        params = layout.named(flats)
    return functional_call(model, params, (images, texts), kwargs, strict=False)
