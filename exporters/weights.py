"""Weight-only quantization of an eager module, as the reference for backends that quantize
after conversion (CoreML, TFLite, ONNX): each linear and embedding weight is replaced by its
quantize-dequantize image under the backend's own rounding rules, so eager PyTorch computes the
same math the artifact should. Where a converter rewrites weights before they are quantized (a
norm's affine folded into the linear layers it feeds), the reference performs the same rewrite."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from edgepack.quant import QuantSpec, WeightQuant
from edgepack.scratch import lasting_temp_dir


@dataclass(frozen=True)
class Rounding:
    """A backend's symmetric integer grid: q = clamp(round(w / scale), qmin, qmax),
    scale = max|w| over the group / scale_divisor, stored as `scale_dtype` when the backend rounds
    its scales (e.g. ai_edge_quantizer keeps 7 mantissa bits of blockwise scales: bfloat16).
    With `signed_scale` the scale carries the sign of the group's value of largest magnitude (the
    negative one on a tie): scale = that value / -scale_divisor, so it lands exactly on qmin and
    the grid reaches one step further on the other side (onnxruntime's MLAS and Gather quantizers)."""

    qmin: int
    qmax: int
    scale_divisor: float
    scale_dtype: torch.dtype | None = None
    signed_scale: bool = False
    # Ties (x.5) round up, toward +inf, instead of to even: onnxruntime's MLAS rounds q + 2^(b-1)
    # (its unsigned storage) half away from zero (measured: -1.5 -> -1, 0.5 -> 1).
    half_up: bool = False

    @classmethod
    def symmetric(cls, bits: int, narrow: bool) -> "Rounding":
        """narrow: [-(2^(b-1)-1), 2^(b-1)-1] (e.g. -7..7); else [-2^(b-1), 2^(b-1)-1] (-8..7)."""
        top = 2 ** (bits - 1) - 1
        return cls(-top if narrow else -top - 1, top, float(top))


def quantize_groups(weight: torch.Tensor, wq: WeightQuant, rounding: Rounding) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes [out, groups, group] of a [out, in] weight, group-wise along `in` (one
    group per row when group_size is None), and each group's scale [out, groups, 1]."""
    rows, cols = weight.shape
    group = wq.group_size or cols
    w = weight.detach().float().reshape(rows, cols // group, group)
    if rounding.signed_scale:
        hi, lo = w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True)
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -rounding.scale_divisor
    else:
        scale = w.abs().amax(dim=-1, keepdim=True) / rounding.scale_divisor
    if rounding.scale_dtype is not None:
        scale = scale.to(rounding.scale_dtype).float()
    # an all-zero group, or one whose scale its dtype flushes to 0 (under fp16's subnormals): codes 0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    ratio = w / scale
    q = torch.clamp(torch.floor(ratio + 0.5) if rounding.half_up else torch.round(ratio), rounding.qmin, rounding.qmax)
    return q, scale


def quantize_min_max(weight: torch.Tensor, bits: int, group_size: int,
                     scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The asymmetric grid of GGUF's Q4_1 and of zero-point formats: each group of a [out, in]
    weight spans its own [min, max] in 2^bits - 1 steps, w ≈ minimum + scale·q with q in
    [0, 2^bits - 1], the scale rounded to `scale_dtype` where the format stores it so. Returns q
    [out, groups, group], scale and minimum [out, groups, 1] (float32). A source already on such a
    grid (a Q4_1 GGUF, fp16 scales) comes back unchanged: its min and max are codes 0 and
    2^bits - 1. A constant group gets scale 0 and q 0."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (2 ** bits - 1)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((w - lo) / safe), 0, 2 ** bits - 1)
    return q, scale, lo


# Rows of a weight quantized at once by the row-wise grids below: their float temporaries stay
# near 64 MB each (a 128k-row vocabulary table's would be gigabytes apiece).
SLICE_ELEMENTS = 1 << 24


def row_slices(rows: int, cols: int, elements: int = SLICE_ELEMENTS) -> list[slice]:
    """The slices of a [rows, cols] weight's rows worked on at once (`elements` values each)."""
    step = max(1, elements // cols)
    return [slice(start, start + step) for start in range(0, rows, step)]


def by_row_slices(blocks: Callable[..., tuple[torch.Tensor, ...]], weight: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    """`blocks(weight, *args)` for a function whose results are row-wise ([out, ...] each, each row
    from its own row of `weight`), computed on slices of rows and joined."""
    slices = row_slices(*weight.shape)
    if len(slices) == 1:
        return blocks(weight, *args)
    return tuple(torch.cat(parts) for parts in zip(*(blocks(weight[rows], *args) for rows in slices)))


def split_min_max(weight: torch.Tensor, block: int, scale_dtype: torch.dtype,
                  smallest_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit offset grid split for kernels whose blocks are symmetric (XNNPACK's, LiteRT's):
    w = scale·c + offset per block, c = q - 8 in -8..7 and offset = minimum + 8·scale. Returns the
    codes c (int8 [out, in]), `scale_dtype`-valued scales and the offsets ([out, blocks], float32).
    A constant block gets code 0, scale 1 and its value as the offset (XNNPACK refuses a block
    scale of 0); a step under `smallest_scale` (what a format's scales cannot hold) widens to it,
    its codes rounded again."""
    return by_row_slices(_split_min_max, weight, block, scale_dtype, smallest_scale)


def _split_min_max(weight: torch.Tensor, block: int, scale_dtype: torch.dtype,
                   smallest_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    q, scale, minimum = quantize_min_max(weight, 4, block, scale_dtype=scale_dtype)
    tiny = (scale > 0) & (scale < smallest_scale)
    if tiny.any():
        scale = torch.where(tiny, torch.full_like(scale, smallest_scale), scale)
        w = weight.detach().float().reshape(q.shape)
        q = torch.clamp(torch.round((w - minimum) / torch.where(scale == 0, 1.0, scale)), 0, 15)
    offset = minimum + 8 * scale
    constant = scale == 0
    q = torch.where(constant, 8.0, q)
    scale = torch.where(constant, 1.0, scale)
    return (q.reshape(rows, cols) - 8).to(torch.int8), scale.reshape(rows, -1), offset.reshape(rows, -1)


# The steps a symmetric 4-bit block's scale search starts from, as max|w| over each: 8 maps the
# largest weight onto -8 (HQQ's start), the smaller ones clip the block's extremes and the larger
# ones leave the grid's ends unused. One least-squares step from each holds nearly all the gain:
# on Gaussian weights and three of the real SmolLM2's linears, 6.3-8.6 % less squared error than
# HQQ alone (its table 3.5 %); eight of these starts with five steps each, 6.5-8.7 % at 1.5x the time.
SCALE_STARTS = (6.0, 6.5, 7.0, 7.25, 7.5, 7.75, 8.0, 8.5, 9.0, 9.5, 10.0, 11.0)


def search_symmetric_scales(weight: torch.Tensor, block: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4 blocks with zero point 0 (codes -8..7, 8da4w's storage) whose scales are searched, not
    taken from the largest weight: for each block, the candidate with the least squared error once
    its scale is rounded to `scale_dtype` (what the format keeps). The candidates: torchao's
    half-quadratic least squares (HQQ, `export_llm`'s choice), judged with its codes rounded again
    to that scale, and one least-squares step from each of SCALE_STARTS, judged with the codes it
    was fitted to (rounding them again to the kept scale, as the returned codes are, can only
    lower the error). So no block is further from its weights than HQQ leaves it. Returns the
    codes (int8 [out, in]) and the scales ([out, blocks], float32 holding `scale_dtype` values;
    an all-zero block gets scale 1, which XNNPACK takes)."""
    return by_row_slices(_search_symmetric_scales, weight, block, scale_dtype)


def _search_symmetric_scales(weight: torch.Tensor, block: int, scale_dtype: torch.dtype):
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // block, block)
    largest, squares = w.abs().amax(-1), (w * w).sum(-1)

    def as_stored(scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale > 0, scale, 1.0).to(scale_dtype).float()

    def codes_for(scale: torch.Tensor) -> torch.Tensor:
        return torch.round(w / scale.unsqueeze(-1)).clamp_(-8, 7)

    def sums(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (w * q).sum(-1), (q * q).sum(-1)

    def error(scale: torch.Tensor, wq: torch.Tensor, qq: torch.Tensor) -> torch.Tensor:
        return squares - 2 * scale * wq + scale * scale * qq  # expanded: no [.., block] temporary

    _, hqq = _choose_qparams_and_quantize_scale_only_hqq(w.reshape(rows, cols), [1, block], -8, 7)
    scale = as_stored(hqq.reshape(rows, -1).float())
    best = error(scale, *sums(codes_for(scale)))
    unit = w / largest.clamp_min(1e-30).unsqueeze(-1)  # each block on -1..1
    for start in SCALE_STARTS:
        wq, qq = sums(torch.round(unit * start).clamp_(-8, 7))
        candidate = as_stored(wq / qq.clamp_min(1))
        # with the codes it was fitted to: rounding them again to the stored scale can only do better
        candidate_error = error(candidate, wq, qq)
        better = candidate_error < best
        scale, best = torch.where(better, candidate, scale), torch.where(better, candidate_error, best)
    scale = torch.where(largest > 0, scale, 1.0)
    return codes_for(scale).reshape(rows, cols).to(torch.int8), scale


# How far the fit's starting grids clip each block: 0, a half and a whole step of its 15 inside its
# min..max. On the real SmolLM2's table one start gave less, 5 and 21 about the same as these
# three; each start is one more pass over the weights.
FIT_CLIPPING = (0.0, 0.5, 1.0)


def fit_min_max_(weight: torch.Tensor, group_size: int, importance: torch.Tensor,
                 dtype: torch.dtype = torch.float16) -> float:
    """In place: `weight` [out, in] moved onto a 4-bit offset grid fitted to its use: each block's
    scale and minimum chosen to minimise Σ importance·error² (importance [in]: the layer's mean
    squared input on calibration text, so error where inputs are large counts more; llama.cpp's
    importance matrix does this for its own types), both in `dtype`. From each of FIT_CLIPPING's
    starting grids, two rounds of weighted least squares (scale and minimum for the codes, then the
    codes again); a block keeps the best fit whose codes still span 0..15, else its min..max grid.
    So every min..max quantizer (weights.quantize_min_max, gguf's Q4_1) holds the result as it
    holds a Q4_1 source, and a block already on such a grid stays as it is. Returns the
    importance-weighted squared error left, as a fraction of min..max's."""
    left, plain = 0.0, 0.0
    with torch.no_grad():
        # an eighth of the other grids' slices: the fit keeps about ten float temporaries alive
        for rows in row_slices(*weight.shape, SLICE_ELEMENTS // 8):
            fitted, error, before = _fit_min_max(weight[rows], group_size, importance.float(), dtype)
            weight[rows] = fitted
            left, plain = left + float(error.sum()), plain + float(before.sum())
    return left / plain if plain > 0 else 1.0


def _fit_min_max(weight: torch.Tensor, group: int, importance: torch.Tensor, dtype: torch.dtype):
    rows, cols = weight.shape
    x = weight.detach().float().reshape(rows, cols // group, group)
    a = (importance + 1e-12 * importance.mean() + 1e-30).reshape(1, cols // group, group)  # no block weighs 0
    q, s, m = quantize_min_max(x.reshape(rows, cols), 4, group, scale_dtype=dtype)
    m = m.to(dtype).float()

    def error(q, s, m):
        return (a * (q * s + m - x) ** 2).sum(-1, keepdim=True)

    plain = best = error(q, s, m)
    kept = (q, s, m)
    lo, span = x.amin(-1, keepdim=True), (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp_min(1e-30)
    total, weighted = a.sum(-1, keepdim=True), (a * x).sum(-1, keepdim=True)
    for clip in FIT_CLIPPING:
        q = torch.clamp(torch.round((x - lo) * ((15 + clip) / span)), 0, 15)
        for _ in range(2):
            aq, aqq, aqx = (a * q).sum(-1, keepdim=True), (a * q * q).sum(-1, keepdim=True), (a * q * x).sum(-1, keepdim=True)
            det = total * aqq - aq * aq
            s = torch.where(det > 0, (total * aqx - aq * weighted) / det.clamp_min(1e-30), 0.0).clamp_min(0).to(dtype).float()
            m = (weighted - s * aq) / total
            q = torch.clamp(torch.round((x - m) / torch.where(s == 0, 1.0, s)), 0, 15)
            m = ((a * (x - s * q)).sum(-1, keepdim=True) / total).to(dtype).float()
        e = error(q, s, m)
        better = (e < best) & (q.amin(-1, keepdim=True) == 0) & (q.amax(-1, keepdim=True) == 15)
        best = torch.where(better, e, best)
        kept = tuple(torch.where(better, new, old) for new, old in zip((q, s, m), kept))
    q, s, m = kept
    return (q * s + m).reshape(rows, cols), best, plain


@dataclass(frozen=True)
class OffsetGrid:
    """The offset grid as a format that stores w = scale·(q - offset) keeps it (CoreML's
    constexpr_blockwise_shift_scale with a float offset): quantize_min_max's codes and scales,
    and offset = -minimum / scale, both in `dtype` (the format's compute precision)."""

    dtype: torch.dtype = torch.float16

    def blocks(self, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [out, in] in 0..15, and scale and offset [out, blocks] in `dtype`. A constant block
        (scale 0) gets scale 1 and offset -value, so it still comes back exactly. A block far from
        zero for its spread (|minimum| over 2^(mantissa bits - 1) steps) gets a wider step, so its
        offset stays finite and rounds by at most half a step (fp16: at most 512 steps)."""
        return by_row_slices(self._blocks, weight, group_size)

    def _blocks(self, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, scale, minimum = quantize_min_max(weight.to(self.dtype), 4, group_size, scale_dtype=self.dtype)
        floor = (minimum.abs() * 2 * torch.finfo(self.dtype).eps).to(self.dtype).float()  # |offset| <= 1 / (2 eps)
        if (scale < floor).any():
            scale = torch.maximum(scale, floor)
            w = weight.to(self.dtype).float().reshape(q.shape)
            q = torch.clamp(torch.round((w - minimum) / torch.where(scale == 0, 1.0, scale)), 0, 15)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        offset = (-minimum / scale).to(self.dtype)
        return q.reshape(weight.shape), scale.squeeze(-1).to(self.dtype), offset.squeeze(-1)

    def image(self, weight: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
        """What the format computes with: scale·(q - offset) per block, in float32."""
        q, scale, offset = self.blocks(weight, wq.group_size)
        rows, cols = weight.shape
        blocks = q.reshape(rows, -1, wq.group_size) - offset.float().unsqueeze(-1)
        return (blocks * scale.float().unsqueeze(-1)).reshape(rows, cols).to(weight.dtype)


def fake_quantize(weight: torch.Tensor, wq: WeightQuant, rounding: Rounding | OffsetGrid) -> torch.Tensor:
    """Quantize-dequantize a [out, in] weight group-wise along `in` (per row when group_size is None)."""
    if isinstance(rounding, OffsetGrid):
        return rounding.image(weight, wq)
    q, scale = quantize_groups(weight, wq, rounding)
    return (q * scale).reshape(weight.shape).to(weight.dtype)


def int8_per_row(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activations as the backends' kernels quantize a linear layer's input (XNNPACK
    qd8, torchao's 8da4w): asymmetric per row (token), range widened to include 0, scale
    (max - min) / 255."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero = torch.clamp(torch.round(-128 - lo / scale), -128, 127)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def weight_only_reference(module: nn.Module, spec: QuantSpec, rounding_for_bits,
                          folded_norms: dict[str, "NormAffine"] | None = None, *,
                          keep_float: frozenset[str] = frozenset()) -> nn.Module:
    """A copy of `module` whose quantized layers hold fake-quantized weights. `rounding_for_bits`
    maps a bit width to the backend's Rounding. Tied weights stay tied (quantized once).

    folded_norms: layer name -> the affine (γ, β) of the norm that feeds it, for converters that
    fold it into the layer before quantizing: the copy does the same fold, so the layer holds
    fake_quantize(W·γ), bias b + W·β, and takes the normalized input (x - β) / γ.

    keep_float: layer names the artifact stores unquantized although the spec covers them (a
    converter that constant-folds a lookup whose indices are fixed never hands it to the quantizer),
    or that the caller replaces itself; their float weights are shared with `module`, not copied,
    unless a quantized layer also holds them (a tied table)."""
    layers = dict(module.named_modules())
    rewritten = {id(m.weight) for name, m in layers.items() if name not in keep_float and spec.for_layer(name, m)}
    shared = {id(p): p for name in keep_float for p in [layers[name].weight] if id(p) not in rewritten}
    copied = copy.deepcopy(module, shared)
    folded_norms = folded_norms or {}
    done: set[int] = set()
    with torch.no_grad():
        for name, layer in copied.named_modules():
            wq = spec.for_layer(name, layer)
            if wq is None or name in keep_float:
                continue
            rounding = rounding_for_bits(wq.bits)
            if name in folded_norms:
                folded_norms[name].fold_into(layer, lambda w: fake_quantize(w, wq, rounding))
                continue
            weight = layer.weight
            if id(weight) not in done:
                done.add(id(weight))
                # in place, a slice of rows at a time: a 1B model's table alone is 1 GB in float32
                for rows in row_slices(*weight.shape):
                    weight[rows] = fake_quantize(weight[rows], wq, rounding)
    return copied


@dataclass(frozen=True)
class NormAffine:
    """A normalization layer's effective per-channel scale and shift: norm(x) = x̂·scale + shift.
    `multiplier` is a constant a converter folds in after the scale (attention's 1/sqrt(head_dim),
    split onto q and k); the fold multiplies in that order, since float products taken in another
    order can round a quantization scale differently."""

    scale: torch.Tensor
    shift: torch.Tensor
    multiplier: float = 1.0

    @classmethod
    def measure(cls, norm: nn.Module, width: int) -> "NormAffine":
        """Measured rather than read (Gemma's RMSNorm scales by 1 + weight): channels of ±1
        alternating normalize to themselves under both LayerNorm and RMSNorm, so
        norm(x) = scale·x + shift and norm(-x) = -scale·x + shift."""
        x = torch.ones(1, 1, width)
        x[..., 1::2] = -1.0
        with torch.no_grad():
            up, down = norm(x).reshape(width), norm(-x).reshape(width)
        return cls((up - down) / (2 * x.reshape(width)), (up + down) / 2)

    def fold_into(self, linear: nn.Linear, quantize) -> None:
        """Make `linear` compute what a converter's fold does: quantize(W·scale·multiplier) on
        x̂ / multiplier, the shift moved into the bias (with the float W, as constant folding
        computes it)."""
        weight = linear.weight.detach()
        bias = weight @ self.shift + (linear.bias.detach() if linear.bias is not None else 0.0)
        linear.weight = nn.Parameter(quantize(weight * self.scale * self.multiplier), requires_grad=False)
        linear.bias = nn.Parameter(bias, requires_grad=False)
        scale = self.scale * self.multiplier
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        linear.register_forward_pre_hook(lambda _, args: (((args[0] - self.shift) / safe),))


def float32_weight_bytes(module: nn.Module) -> int:
    """The module's weights in float32, tied ones counted once (what a float graph stores)."""
    return sum(p.numel() for p in module.parameters()) * 4


def too_large_for_memory(module: nn.Module, per_weight_byte: float, what: str, have: int) -> str | None:
    """Why a machine granting `have` bytes cannot export `module` when `what` holds about
    `per_weight_byte` times its float32 weights (the kernel would kill the export mid-way, with
    no message), or None."""
    weights = float32_weight_bytes(module)
    need = per_weight_byte * weights
    if need <= have:
        return None
    return (f"the model's float32 weights are {weights / 1e9:.2f} GB, and {what} holds about {per_weight_byte:g}x that "
            f"({need / 1e9:.0f} GB) while this machine grants {have / 1e9:.0f} GB of memory: it would be killed mid-way "
            f"(a machine with {need / 1e9:.0f} GB or more can take it)")


def too_large_for_weights_folder(module: nn.Module, per_weight_byte: float, what: str) -> str | None:
    """Why `what`, which keeps up to `per_weight_byte` times the model's float32 weights in a
    temporary folder (e.g. export_onnx's weights_dir), cannot run where TMPDIR has less free, or None."""
    weights = float32_weight_bytes(module)
    folder = lasting_temp_dir()  # TMPDIR as the user set it (the run's own folder is inside it)
    need, free = per_weight_byte * weights, shutil.disk_usage(folder).free
    if need <= free:
        return None
    return (f"{what} keeps the model's float32 weights ({weights / 1e9:.2f} GB) in a folder under {folder} while it "
            f"works, up to {per_weight_byte:g}x that ({need / 1e9:.1f} GB), and {folder} has {free / 1e9:.1f} GB free: "
            f"set TMPDIR to a folder with {need / 1e9:.1f} GB free")


def copy_sharing_weights(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are the original's own tensors, not copies (its
    buffers, e.g. KV caches, are copied): for work that runs the copy or replaces its weights but
    never writes into them. A 1B model's float weights are 5 GB: a full copy is a second 5 GB."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})


def run_copy_with_hooks(module: nn.Module, example_inputs: tuple, install: Callable[[nn.Module], list]) -> nn.Module:
    """Run a copy of `module` once (the forward pass may write caches) with the hooks that
    `install(copy)` registers, removed after; returns the copy."""
    probe = copy_sharing_weights(module)
    hooks = install(probe)
    try:
        with torch.no_grad():
            probe(*example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return probe


def linears_fed_by_norms(module: nn.Module, example_inputs: tuple,
                         is_norm: Callable[[nn.Module], bool]) -> dict[str, NormAffine]:
    """Linear layers whose input is exactly the output of a norm layer (`is_norm`), with that
    norm's measured affine, found by running `module` once on a copy."""
    outputs: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # tensors kept alive: ids stay unique
    found: dict[str, nn.Module] = {}

    def install(probe: nn.Module) -> list:
        hooks = []
        for name, layer in probe.named_modules():
            if is_norm(layer):
                hooks.append(layer.register_forward_hook(lambda m, _, out: outputs.__setitem__(id(out), (out, m))))
            elif isinstance(layer, nn.Linear):
                def seen(_, args, name=name):
                    if id(args[0]) in outputs:
                        found[name] = outputs[id(args[0])][1]
                hooks.append(layer.register_forward_pre_hook(seen))
        return hooks

    layers = dict(run_copy_with_hooks(module, example_inputs, install).named_modules())
    return {name: NormAffine.measure(norm, layers[name].in_features) for name, norm in found.items()}
