"""Forward-mode passes that are differentiated afterwards (reverse over forward: TESLA's pass 2 with
method.tesla_pass2=forward), made exact.

PyTorch's forward-mode formulas of some fused kernels are not themselves differentiable to the inputs (torch 2.x,
measured in float64 against double backward): the normalisations computed from their input's statistics
(group_norm, instance_norm, layer_norm, batch_norm with batch statistics) give a tangent whose gradient to the
input is silently wrong (33 %-130 % off on small cases: the statistics' dependence on the input is lost), and
log_softmax, softmax, logsumexp and cross_entropy raise (their formulas write in place into a saved result).
`ComposedForForwardMode` (a TorchFunctionMode) computes exactly these from elementary ops whose forward and
backward formulas compose, so the tangent's gradient is exact; every other op runs as it is. Attention kernels
(scaled_dot_product_attention) have no double backward on the CPU either and are refused with a sentence.
tests/test_tesla_forward.py checks each replacement against the fused op and against double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mmdd.errors import MmddError


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs in float32, as autocast runs the fused norms and softmaxes (its float32 op list)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _normalise(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    x = _wide(x)
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(dims, keepdim=True)  # biased, as the fused kernels normalise
    return centred * torch.rsqrt(var + eps)


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = input.shape[:2]
    y = _normalise(input.reshape(n, num_groups, -1), (2,), eps).reshape(input.shape)
    return _affine(y, weight, bias)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    if not use_input_stats or running_mean is not None or running_var is not None:
        raise MmddError("method.tesla_pass2=forward: instance norm with running statistics is not supported; use "
                        "method.tesla_pass2=double_backward for this model")
    return group_norm(input, input.shape[1], weight, bias, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    y = _normalise(input, dims, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    dims = (0, *range(2, input.dim()))
    if training or running_mean is None:  # batch statistics
        if training and running_mean is not None:  # the running estimates move as the fused kernel moves them
            with torch.no_grad():
                n = input.numel() / input.shape[1]
                running_mean.mul_(1 - momentum).add_(input.mean(dims), alpha=momentum)
                running_var.mul_(1 - momentum).add_(input.var(dims, unbiased=False) * n / max(n - 1, 1),
                                                    alpha=momentum)
        y = _normalise(input, dims, eps)
    else:  # fixed statistics: an affine map of the input
        shape = (1, -1) + (1,) * (input.dim() - 2)
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias)


def logsumexp(input, dim, keepdim=False):
    input = _wide(input)
    shift = input.detach().amax(dim, keepdim=True)  # any constant shift is exact: the result does not depend on it
    out = shift + (input - shift).exp().sum(dim, keepdim=True).log()
    return out if keepdim else out.squeeze(dim)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    x = _wide(input if dtype is None else input.to(dtype))
    return x - logsumexp(x, dim, keepdim=True)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    return log_softmax(input, dim, dtype=dtype).exp()


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0):
    if weight is not None or label_smoothing or size_average is not None or reduce is not None or target.is_floating_point():
        raise MmddError("method.tesla_pass2=forward: cross_entropy with class weights, label smoothing or soft targets "
                        "is not supported; use method.tesla_pass2=double_backward")
    logp = log_softmax(input, 1)
    keep = target != ignore_index
    picked = -logp.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1) * keep
    if reduction == "mean":
        return picked.sum() / keep.sum()
    return picked.sum() if reduction == "sum" else picked


def _refuse_attention(*args, **kwargs):
    raise MmddError("method.tesla_pass2=forward: attention kernels (scaled_dot_product_attention) cannot be "
                    "differentiated twice here; use method.tesla_pass2=double_backward or a model without attention")


COMPOSED = {
    F.group_norm: group_norm, F.instance_norm: instance_norm, F.layer_norm: layer_norm, F.batch_norm: batch_norm,
    F.log_softmax: log_softmax, F.softmax: softmax, F.cross_entropy: cross_entropy,
    torch.logsumexp: logsumexp, torch.Tensor.logsumexp: logsumexp,
    torch.log_softmax: log_softmax, torch.Tensor.log_softmax: log_softmax,
    torch.softmax: softmax, torch.Tensor.softmax: softmax,
    F.scaled_dot_product_attention: _refuse_attention,
}


class ComposedForForwardMode(TorchFunctionMode):
    """Within it, the ops above run as their elementary compositions (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return COMPOSED.get(func, func)(*args, **kwargs)
