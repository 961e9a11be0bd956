"""Rows' key/value caches moved between batches: cut or left-padded to a common width, two joined into one.

A batch's cache and its mask share one column per position; rows are right-aligned (left padding), so
padding or cutting on the left with masked columns changes no row's answer. Only plain dynamic caches
(full and sliding-window layers) are moved, and never under chunked attention, whose chunks count columns;
any other cache stays in the batch it was prefilled in.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def chunked(config) -> bool:
    return "chunked_attention" in (getattr(config.get_text_config(decoder=True), "layer_types", None) or ())


def movable(cache) -> bool:
    return (
        type(cache) is DynamicCache
        and not cache.offloading
        and all(type(la) in (DynamicLayer, DynamicSlidingWindowLayer) and la.is_initialized for la in cache.layers)
    )


def _left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` cut or zero-padded on the left along `dim` to `length`."""
    have = t.shape[dim]
    if length <= have:
        return t.narrow(dim, have - length, length)
    shape = list(t.shape)
    shape[dim] = length - have
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def resize(cache: DynamicCache, mask: torch.Tensor, length: int) -> torch.Tensor:
    """`cache` cut or left-padded in place to `length` columns; the mask to match. A sliding layer keeps only
    its window, and counts the columns it has seen."""
    delta = length - mask.shape[1]
    for layer in cache.layers:
        keep = length
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length += delta
            keep = min(layer.cumulative_length, layer.sliding_window - 1)
        layer.keys, layer.values = _left(layer.keys, keep, -2), _left(layer.values, keep, -2)
    return _left(mask, length, 1)


def unread(mask: torch.Tensor) -> int:
    """How many leading columns no row reads (their rows have left)."""
    return int(mask.any(0).int().argmax())


def join(a: DynamicCache, b: DynamicCache) -> None:
    """`b`'s rows appended to `a`'s, both already `resize`d to one width."""
    for la, lb in zip(a.layers, b.layers):
        la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])
