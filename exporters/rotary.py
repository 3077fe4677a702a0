"""The rotary embedding of transformers' Llama-style families (halves rotated, not interleaved),
for the backends that apply it in a form of their own: ONNX's fused attention takes it into the
op (onnx/group_query_attention.py), and ExecuTorch rotates with one split kernel per tensor
instead of two slices (XNNPACK's partitioner takes no slice over the dynamic token length, so
each one is a kernel call of its own between two delegate calls). A family counts as the
halves-rotated kind only when its own apply_rotary_pos_emb gives `rotate`'s values on random
inputs; the others keep their code."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, N, T, D]; cos/sin [1, T, R], or [1, 1, T, R] already widened to the heads, their two
    halves equal: the first R features of each head rotated (all of them but for partial rotary)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    width = cos.shape[-1]
    part, rest = x.split([width, x.shape[-1] - width], dim=-1) if width < x.shape[-1] else (x, None)
    first, second = part.split(width // 2, dim=-1)
    turned = part * cos + torch.cat([-second, first], dim=-1) * sin
    return turned if rest is None else torch.cat([turned, rest], dim=-1)


def rotates_halves(apply_rotary_pos_emb) -> bool:
    """Whether a family's apply_rotary_pos_emb is `rotate`, tried on random values: families
    with interleaved or partial rotary keep theirs."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=generator), torch.randn(1, 2, 3, 8, generator=generator)
    angles = torch.randn(1, 3, 4, generator=generator).repeat(1, 1, 2)
    try:
        out_q, out_k = apply_rotary_pos_emb(q, k, angles.cos(), angles.sin())
    except (TypeError, RuntimeError):
        return False
    return all(torch.allclose(out, rotate(x, angles.cos(), angles.sin()), atol=1e-6) for out, x in ((out_q, q), (out_k, k)))


def halves_rotating_families(model: nn.Module) -> tuple[str, ...]:
    """The names of the modeling modules of `model`'s attention layers whose apply_rotary_pos_emb
    is the halves-rotated kind (names, not modules: a module holding them is deep-copied). Runs
    torch ops: call it before a trace, not inside one."""
    families = sorted({type(m).__module__ for m in model.modules() if hasattr(m, "layer_idx")})
    return tuple(name for name in families
                 if rotates_halves(getattr(sys.modules[name], "apply_rotary_pos_emb", None)))


@contextlib.contextmanager
def replaced_rotary(families: tuple[str, ...], make) -> Iterator[None]:
    """While inside, each family's apply_rotary_pos_emb is `make(original)`; restored on leaving."""
    originals = {sys.modules[name]: sys.modules[name].apply_rotary_pos_emb for name in families}
    for family, original in originals.items():
        family.apply_rotary_pos_emb = make(original)
    try:
        yield
    finally:
        for family, original in originals.items():
            family.apply_rotary_pos_emb = original


def _rotate_by_split(original):
    """apply_rotary_pos_emb as `rotate`: the same products and sums, so the same values to the
    bit. The model's rotary module computes cos/sin once per call and hands the same tensors to
    every layer; they are widened to the heads once (one unsqueeze kernel each, not one a layer)."""
    widened: dict[str, tuple] = {}

    def apply(q, k, cos, sin, *args, **kwargs):
        if cos.shape[-1] != q.shape[-1] or cos.dim() != 3 or args or kwargs:
            return original(q, k, cos, sin, *args, **kwargs)
        if widened.get("from") is not cos:
            widened.update({"from": cos, "to": (cos.unsqueeze(1), sin.unsqueeze(1))})
        return rotate(q, *widened["to"]), rotate(k, *widened["to"])
    return apply


def rotary_by_split(families: tuple[str, ...]):
    """While inside, the halves-rotating `families` (halves_rotating_families) rotate with one
    split per tensor and widen cos/sin once per call of the model."""
    return replaced_rotary(families, _rotate_by_split)
