"""The one backend-neutral description of weight quantization; each backend translates it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Mapping

import torch
from torch import nn

from edgepack.errors import InputError

Scheme = Literal["int4", "int8", "none"]
SCHEMES: tuple[str, ...] = ("int4", "int8", "none")


@dataclass(frozen=True)
class WeightQuant:
    """How one kind of layer stores its weights."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool = True

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        if self.bits == 4 and self.group_size:
            # blocks of int4 are stored on each backend's own grid (offset or symmetric, the
            # artifact's `grid`): the spec does not say which
            return f"int4 {group}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class QuantSpec:
    """Which layers are quantized and how. Layers are resolved by type: linear (lm_head included)
    or embedding; anything else (norms, biases) stays fp32. `overrides` names the layers stored
    otherwise (mixed precision), by their path in the captured module that every backend lowers;
    `plan` records how they were chosen."""

    scheme: Scheme
    linear: WeightQuant | None
    embedding: WeightQuant | None
    dynamic_int8_activations: bool
    overrides: Mapping[str, WeightQuant] = field(default_factory=dict)
    plan: Mapping | None = None

    @classmethod
    def from_options(cls, scheme: str, group_size: int = 32) -> "QuantSpec":
        if scheme not in SCHEMES:
            raise InputError(f"--quant {scheme!r} is not a scheme", hint=f"choose one of {', '.join(SCHEMES)}")
        if group_size < 1 or group_size & (group_size - 1):
            raise InputError(f"--group-size {group_size} must be a power of two", hint="32 is the default")
        if scheme == "int4":
            four = WeightQuant(bits=4, group_size=group_size)
            return cls(scheme, linear=four, embedding=four, dynamic_int8_activations=True)
        if scheme == "int8":
            eight = WeightQuant(bits=8, group_size=None)
            return cls(scheme, linear=eight, embedding=eight, dynamic_int8_activations=True)
        return cls(scheme, linear=None, embedding=None, dynamic_int8_activations=False)

    def for_layer(self, name: str, module: nn.Module) -> WeightQuant | None:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return None
        if name in self.overrides:
            return self.overrides[name]
        return self.linear if isinstance(module, nn.Linear) else self.embedding

    def with_overrides(self, overrides: Mapping[str, WeightQuant], plan: Mapping) -> "QuantSpec":
        return replace(self, overrides=dict(sorted(overrides.items())), plan=plan)

    def layers(self, model: nn.Module) -> dict[str, WeightQuant]:
        """Every quantized layer of `model` (named as in the captured module) and how it is stored."""
        found = {name: self.for_layer(name, m) for name, m in model.named_modules()}
        return {name: wq for name, wq in found.items() if wq is not None}

    def check_model(self, model: nn.Module) -> None:
        """Fail before any work if a group does not divide a layer's input width."""
        bad = []
        for name, module in model.named_modules():
            wq = self.for_layer(name, module)
            if wq is None or wq.group_size is None:
                continue
            width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
            if width % wq.group_size:
                bad.append(f"{name} (width {width})")
        if bad:
            raise InputError(
                f"--group-size {self.linear.group_size if self.linear else ''} does not divide the input width of "
                f"{len(bad)} layer(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
                hint="pick a group size that divides every layer width (e.g. 32 or 16), or --quant int8",
            )

    def describe(self) -> dict:
        described = {
            "scheme": self.scheme,
            "linear": self.linear.describe() if self.linear else "fp32",
            "embedding": self.embedding.describe() if self.embedding else "fp32",
            "activations": "int8 dynamic" if self.dynamic_int8_activations else "fp32",
        }
        if self.overrides:
            described["overrides"] = {name: wq.describe() for name, wq in self.overrides.items()}
        if self.plan:
            described["plan"] = dict(self.plan)
        return described

    def record(self) -> dict:
        """Every field, as JSON (the stage cache's form); from_record gives the same spec back."""
        return {"scheme": self.scheme, "linear": self.linear and asdict(self.linear),
                "embedding": self.embedding and asdict(self.embedding),
                "dynamic_int8_activations": self.dynamic_int8_activations,
                "overrides": {name: asdict(wq) for name, wq in self.overrides.items()}, "plan": self.plan}

    @classmethod
    def from_record(cls, r: dict) -> "QuantSpec":
        def weight(d: dict | None) -> WeightQuant | None:
            return d and WeightQuant(**d)

        return cls(r["scheme"], weight(r["linear"]), weight(r["embedding"]), r["dynamic_int8_activations"],
                   {name: WeightQuant(**d) for name, d in r["overrides"].items()}, r["plan"])

    def ideal_bytes(self, model: nn.Module, *, float_bits: int = 32, scale_bits: int = 16,
                    side_bits: Callable[[torch.Tensor, WeightQuant], float] | None = None,
                    offsets: Callable[[WeightQuant], bool] | None = None) -> int:
        """Size of the parameters stored exactly as the scheme says, tied weights once: each
        quantized weight at its bits plus one scale (scale_bits) per group, or per row when
        per-channel, and an offset of as many bits beside it where offsets(wq) says the weight is
        on an offset grid; everything else at float_bits. side_bits(weight, wq) replaces the
        scales for schemes that store other side data (e.g. palettes)."""
        bits = 0.0
        quantized: set[int] = set()
        for name, module in model.named_modules():
            wq = self.for_layer(name, module)
            weight = getattr(module, "weight", None)
            if wq is None or weight is None or id(weight) in quantized:
                continue
            quantized.add(id(weight))
            rows, cols = weight.shape
            groups = rows * (cols // (wq.group_size or cols))
            per_group = scale_bits * (2 if offsets and offsets(wq) else 1)
            bits += weight.numel() * wq.bits + (side_bits(weight, wq) if side_bits else groups * per_group)
        rest = {id(p): p for p in model.parameters() if id(p) not in quantized}
        bits += sum(p.numel() for p in rest.values()) * float_bits
        return int(bits // 8)
