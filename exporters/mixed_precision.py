"""Mixed precision for encoders: int4 wherever the embeddings can afford it, int8 where they cannot.

int4 round-to-nearest costs a small encoder more than users accept (MiniLM-L6: sentence
embeddings 0.93-0.96 cosine from fp32; GPTQ, AWQ clipping and QAT reach at most 0.986 and do not
carry across the backends' different grids). So the layers whose int4 weights cost the most
accuracy per stored bit are kept at int8 (per channel), fewest first in that order, until the
calibration texts' outputs clear the quality floor from fp32 with a margin (the target, see
plan_mixed_precision). The plan is made once on the
coarsest grid any backend uses (symmetric -7..7, CoreML's) with the int8 dynamic activations the
kernels add, so it holds on the finer ones; each artifact's real quality is then measured by the
smoke against fp32 and recorded."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgepack
from edgepack.cases import row_cosines
from edgepack.errors import InputError
from edgepack.exporters.tokenizer import encode
from edgepack.exporters.weights import Rounding, fake_quantize, int8_per_row
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel

BUILT_IN_TEXTS = Path(edgepack.__file__).parent / "calibration_texts.txt"
DEFAULT_FLOOR = 0.99
INT8 = WeightQuant(bits=8, group_size=None)


def read_calibration(path: Path | None) -> tuple[list[str], str]:
    """The texts to plan with (one per line; blank lines skipped) and where they came from."""
    source = path or BUILT_IN_TEXTS
    if not source.is_file():
        raise InputError(f"--calibration {source}: no such file", hint="give a text file with one sentence per line")
    texts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(texts) < 4:
        raise InputError(f"--calibration {source}: {len(texts)} non-empty line(s); at least 4 are needed",
                         hint="one sentence per line, like the texts the model will embed in the app")
    return texts, "built-in (edgepack/calibration_texts.txt)" if path is None else str(path)


class _Trial:
    """The captured encoder with each candidate layer's weight switchable between fp32, int4 and
    int8 images, and its outputs on the calibration texts against fp32."""

    def __init__(self, captured: CapturedModel, spec: QuantSpec, texts: list[str]):
        self.module = copy.deepcopy(captured.module).eval()
        limit = captured.loaded.facts.max_positions
        ids = [encode(captured.loaded.tokenizer, t)[:limit] for t in texts]
        # One padded batch: a trial is one forward pass, not one per text.
        self.lengths = [len(i) for i in ids]
        self.ids = torch.zeros(len(ids), max(self.lengths), dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for row, (text_ids, n) in enumerate(zip(ids, self.lengths)):
            self.ids[row, :n], self.mask[row, :n] = torch.tensor(text_ids), 1
        layers, stored = dict(self.module.named_modules()), spec.layers(self.module)
        self.fp32 = self._outputs()
        self.weights = {name: layers[name].weight for name, wq in stored.items() if wq.bits == 4}
        grid = {bits: Rounding.symmetric(bits, narrow=True) for bits in (4, 8)}
        self.images = {
            name: {None: w.detach().clone(),
                   4: fake_quantize(w, stored[name], grid[4]),
                   8: fake_quantize(w, INT8, grid[8])}
            for name, w in self.weights.items()
        }
        if spec.dynamic_int8_activations:  # every quantized linear's input, as the kernels will
            for name, layer in layers.items():
                if isinstance(layer, nn.Linear) and name in stored:
                    layer.register_forward_pre_hook(lambda _, args: (int8_per_row(args[0]),))

    @torch.no_grad()
    def _outputs(self) -> list[np.ndarray]:
        """Each text's output: its sentence embedding, or its tokens' states without the padding."""
        out = self.module(self.ids, self.mask).numpy()
        return [out[row, :n] if out.ndim == 3 else out[row] for row, n in enumerate(self.lengths)]

    @torch.no_grad()
    def outputs(self, bits: dict[str, int | None]) -> list[np.ndarray]:
        """The outputs with each layer's weight at bits[name] (4, 8, or None for fp32)."""
        for name, weight in self.weights.items():
            weight.copy_(self.images[name][bits.get(name)])
        return self._outputs()

    def cosines(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Per-row cosines of `outputs` vs fp32: one per sentence embedding, or per token's state."""
        return np.array([c for exp, act in zip(self.fp32, outputs) for c in row_cosines(exp, act)])

    def cosines_at(self, bits: dict[str, int | None]) -> np.ndarray:
        return self.cosines(self.outputs(bits))


def plan_mixed_precision(captured: CapturedModel, spec: QuantSpec, texts: list[str], source: str,
                         floor: float, on_step=None) -> QuantSpec:
    """`spec` with int8 overrides for the fewest stored bits that keep every calibration output at
    cosine >= the target from fp32 (or every int4 layer at int8 when even that is not enough). The
    target lies halfway between the floor and 1: texts the plan never saw land lower than those it
    did (MiniLM-L6, 20 held-out sentences: planned to 0.99 on the built-in texts they measured
    0.984; to 0.995, 0.9947)."""
    step = on_step or (lambda _: None)
    step("calibration outputs")
    trial = _Trial(captured, spec, texts)
    names = list(trial.weights)
    target = round(floor + (1 - floor) / 2, 6)
    all_int4 = trial.cosines_at({n: 4 for n in names})
    plan = {"method": "int8 for the layers whose int4 weights cost most per stored bit, fewest first; then "
                      "each one the target does not need back to int4, largest first",
            "floor": floor, "target": target, "metric": "min cosine vs fp32 over the calibration outputs (one per sentence embedding or token)",
            "calibration": {"texts": len(texts), "source": source},
            "grid": "symmetric int4 -7..7 / int8 -127..127 (the coarsest any backend stores)"
                    + (", int8 dynamic activations per row" if spec.dynamic_int8_activations else ""),
            "all_int4_min_cosine": round(float(all_int4.min()), 6)}
    order: list[str] = []
    unused: list[str] = []

    def holds(int8: list[str]) -> bool:
        return trial.cosines_at({n: 8 if n in int8 else 4 for n in names}).min() >= target

    if all_int4.min() < target:
        step(f"sensitivity of {len(names)} layers")
        order, unused = _costliest_first(trial, names)
        step("fewest int8 layers")
        order = order[:_fewest(lambda k: holds(order[:k]), len(order))]
        if holds(order):
            step("return unneeded layers to int4")
            for name in sorted(order, key=lambda n: -trial.weights[n].numel()):  # the most bytes back first
                if holds(rest := [n for n in order if n != name]):
                    order = rest
    planned = trial.cosines_at({n: 8 if n in order else 4 for n in names})
    names = [n for n in names if n not in unused]
    int4_weights = sum(trial.weights[n].numel() for n in names if n not in order)
    plan.update({
        "int8_layers": len(order), "int4_layers": len(names) - len(order), "unused_layers": unused,
        "int4_weight_fraction": round(int4_weights / sum(trial.weights[n].numel() for n in names), 4),
        "planned_min_cosine": round(float(planned.min()), 6), "planned_mean_cosine": round(float(planned.mean()), 6),
        "floor_met": bool(planned.min() >= floor), "target_met": bool(planned.min() >= target),
    })
    return spec.with_overrides({n: INT8 for n in order}, plan)


def _costliest_first(trial: _Trial, names: list[str]) -> tuple[list[str], list[str]]:
    """The layers by the damage each does alone at int4, per weight it would store at 4 more bits
    at int8, highest first; and the layers whose weights do not reach the outputs (a pooler that
    mean pooling ignores), which are no candidates."""
    baseline, cost, unused = trial.outputs({}), {}, []
    for name in names:
        alone = trial.outputs({name: 4})
        if all(np.array_equal(a, b) for a, b in zip(alone, baseline)):
            unused.append(name)
        else:
            cost[name] = (1 - trial.cosines(alone).mean()) / trial.weights[name].numel()
    return sorted(cost, key=lambda n: -cost[n]), unused


def _fewest(holds, n: int) -> int:
    """The smallest k in 0..n with holds(k), by bisection (more int8 layers only help, give or take
    noise; the caller measures the chosen k again); n when none holds."""
    lo, hi = 0, n
    if not holds(n):
        return n
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
