"""Mixed precision for decoder LMs: int8 for the weights whose int4 rounding costs the model most
per extra stored bit, within a bits-per-weight budget.

A layer's cost is estimated from the calibration text's loss, not from output cosines: with the
diagonal Fisher information F of the next-token loss (squared gradients, summed over chunks of
text), rounding a weight by d costs about F * d^2 / 2 nats. One backward pass per chunk ranks every
layer, where trying each layer at int8 in turn would take one forward pass per layer. The tied
embedding / LM head of small models is one weight and one choice: its Fisher sums both uses.

Each int4 grid the export's backends store gets its own plan, from the same gradients: the
offset grid (each block its own min..max) stores a scale and an offset per block, 5 bits a
weight at g32, and keeps a source already on it (a Q4_1 GGUF) nearly exact, where int8 buys
nothing; the symmetric grid rounds on -7..7 (the coarsest any backend stores, CoreML's) with one
scale, 4.5 bits. Each artifact's real quality is then measured on the evaluation text through its
own runtime, apart from the calibration text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgepack.errors import InputError
from edgepack.exporters.mixed_precision import INT8
from edgepack.exporters.tokenizer import encode
from edgepack.exporters.weights import OffsetGrid, Rounding, fake_quantize, fit_min_max_, row_slices
from edgepack.packaging.quality import DEFAULT_BITS_PER_WEIGHT
from edgepack.quant import QuantSpec, WeightQuant
from edgepack.stages import CapturedModel

CHUNK = 128  # tokens per backward pass


@dataclass(frozen=True)
class Int4Grid:
    """How an int4 grid rounds, and how many fp16 numbers it stores per block beside the codes."""

    rounding: Rounding | OffsetGrid
    per_block: int
    described: str


INT4_GRID = {
    "offset": Int4Grid(OffsetGrid(torch.float16), 2, "offset int4 (each block its own min..max; an fp16 scale and "
                                                       "offset per block)"),
    "symmetric": Int4Grid(Rounding.symmetric(4, narrow=True), 1, "symmetric int4 -7..7 (the coarsest any backend "
                                                                   "stores; an fp16 scale per block)"),
}
EIGHT = Rounding.symmetric(8, narrow=True)
BLOCK_FIT = ("each 4-bit block's scale and minimum fitted to the calibration text: weighted least squares, "
             "weighted by the layer's mean squared input (weights.fit_min_max_); a block already on the grid "
             "stays as it is")


def stored_bits(wq: WeightQuant, cols: int, grid: str = "symmetric", scale_bits: int = 16) -> float:
    """Bits a weight of a layer `cols` wide takes as wq stores it on `grid` (int4's; int8 is per
    channel with one scale), its scales and offsets included."""
    per_block = INT4_GRID[grid].per_block if wq.bits == 4 else 1
    return wq.bits + per_block * scale_bits / (wq.group_size or cols)


def check_budget(spec: QuantSpec, budget: float) -> None:
    floor = stored_bits(spec.linear, 1 << 30)
    if not floor <= budget <= 8.5:
        raise InputError(f"--bits-per-weight {budget:g} is outside {floor:g}..8.5 ({spec.linear.describe()} "
                         f"with fp16 scales stores {floor:g} bits a weight; int8 per channel about 8)",
                         hint=f"the default is {DEFAULT_BITS_PER_WEIGHT:g}; {floor:g} keeps every layer int4")


def plan_decoder_precision(captured: CapturedModel, spec: QuantSpec, texts: list[str], source: str,
                           budget: float, grids: tuple[str, ...] = ("symmetric",), on_step=None) -> dict[str, QuantSpec]:
    """For each int4 grid in `grids`: `spec` with int8 per-channel overrides for the layers that
    buy the most estimated loss per extra bit, costliest first, while the quantized weights
    average at most `budget` bits as that grid stores them. A budget under the grid's own all-int4
    bits keeps every layer int4 (the plan's bits_per_weight says what it costs)."""
    step = on_step or (lambda _: None)
    layers = dict(captured.module.named_modules())
    units: dict[int, tuple[torch.Tensor, list[str], WeightQuant]] = {}
    for name, wq in spec.layers(captured.module).items():
        weight = layers[name].weight
        units.setdefault(id(weight), (weight, [], wq))[1].append(name)  # a tied weight is one unit
    chunks = _chunks(captured, texts)
    tokens = sum(c.numel() for c in chunks)
    step(f"loss gradients on {tokens} calibration tokens")
    fisher = _fisher(captured.loaded.module, chunks, [w for w, _, _ in units.values()])

    calibration = {"texts": len(texts), "source": source, "tokens": tokens}
    plans = {}
    for grid in grids:
        step(f"cost of {len(units)} weights at int4 ({grid} grid) and int8")
        plans[grid] = _plan_on_grid(spec, list(units.values()), fisher, grid, budget, calibration)
    return plans


def _plan_on_grid(spec: QuantSpec, units: list, fisher: list[torch.Tensor], grid: str, budget: float,
                  calibration: dict) -> QuantSpec:
    four = INT4_GRID[grid]
    total_bits = sum(w.numel() * stored_bits(wq, w.shape[1], grid) for w, _, wq in units)
    numel = sum(w.numel() for w, _, _ in units)
    candidates = []
    for (weight, names, wq), f in zip(units, fisher):
        if wq.bits != 4:
            continue
        w = weight.detach().float()
        cost4, cost8 = _rounding_cost(w, f, wq, four.rounding), _rounding_cost(w, f, INT8, EIGHT)
        extra = w.numel() * (stored_bits(INT8, w.shape[1], grid) - stored_bits(wq, w.shape[1], grid))
        candidates.append((names, cost4, cost8, extra))
    spare = budget * numel - total_bits
    chosen, saved = [], 0.0
    # Ranked on 4 significant digits, ties by name: gradients summed on other thread counts differ
    # in the last bits, and the plan (so the artifact's bytes) must not.
    for names, cost4, cost8, extra in sorted(candidates, key=lambda c: (-float(f"{(c[1] - c[2]) / c[3]:.4g}"), c[0])):
        if cost4 > cost8 and extra <= spare:
            chosen += names
            spare -= extra
            saved += cost4 - cost8
    all_int4 = sum(c[1] for c in candidates)
    plan = {
        "method": "int8 per channel for the weights whose int4 rounding costs the calibration loss most per extra "
                  "stored bit (diagonal Fisher estimate), costliest first, within the bits-per-weight budget",
        "budget_bits_per_weight": budget,
        "bits_per_weight": round(budget - spare / numel, 4),
        "calibration": calibration,
        "grid": f"{four.described} / int8 -127..127 per channel",
        "int8_layers": len(chosen), "int4_layers": sum(len(c[0]) for c in candidates) - len(chosen),
        "int8_layer_names": sorted(chosen),
        "estimated_loss_all_int4": round(all_int4 / calibration["tokens"], 6),
        "estimated_loss_planned": round((all_int4 - saved) / calibration["tokens"], 6),
    }
    return spec.with_overrides({n: INT8 for n in chosen}, plan)


def fit_offset_blocks(captured: CapturedModel, spec: QuantSpec, texts: list[str], on_step=None) -> dict:
    """In place: every int4 weight of the offset grid's plan `spec` that a linear layer reads moved
    onto its block grid fitted to that layer's inputs on the calibration texts (weights.fit_min_max_;
    a tied table by its LM head's inputs). The backends' min..max quantizers then hold these
    weights exactly, as they hold a Q4_1 source's, so every offset-grid backend stores the same
    fitted blocks. An untied embedding table, whose lookup has no input to weigh by, keeps
    min..max. Returns the weights searched, how many moved, and the median of the moved ones'
    importance-weighted error as a fraction of min..max's."""
    step = on_step or (lambda _: None)
    layers = dict(captured.module.named_modules())
    fitted: dict[int, tuple[torch.Tensor, torch.nn.Linear, WeightQuant]] = {}
    for name, wq in spec.layers(captured.module).items():
        if wq.bits == 4 and wq.group_size and isinstance(layers[name], torch.nn.Linear):
            fitted.setdefault(id(layers[name].weight), (layers[name].weight, layers[name], wq))
    chunks = _chunks(captured, texts)
    step(f"input magnitudes on {sum(c.numel() for c in chunks)} calibration tokens")
    squares = {id(linear): torch.zeros(linear.in_features) for _, linear, _ in fitted.values()}

    def add_squares(linear, args):
        x = args[0].detach().float()
        squares[id(linear)] += (x * x).reshape(-1, x.shape[-1]).sum(0)

    hooks = [linear.register_forward_pre_hook(add_squares) for _, linear, _ in fitted.values()]
    threads = torch.get_num_threads()
    try:
        # One thread: a float32 matmul sums in an order that depends on the thread count, and the
        # fit turns the last bits of these inputs into different fp16 scales in some blocks (on the
        # real SmolLM2-135M, 859 table rows differed between 1 and 2 threads): the artifact's bytes
        # must not depend on the machine's cores.
        torch.set_num_threads(1)
        with torch.no_grad():
            for chunk in chunks:
                captured.loaded.module(input_ids=chunk, use_cache=False)
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()
    step(f"fit {len(fitted)} weights' blocks")
    ratios = [fit_min_max_(weight, wq.group_size, squares[id(linear)]) for weight, linear, wq in fitted.values()]
    changed = [r for r in ratios if r < 1]
    return {"weights": len(fitted), "changed": len(changed),
            "median_weighted_error_vs_min_max": round(sorted(changed)[len(changed) // 2], 3) if changed else 1.0}


def _rounding_cost(w: torch.Tensor, f: torch.Tensor, wq: WeightQuant, rounding) -> float:
    """F·d²/2 summed over the weight, d its rounding error, a slice of rows at a time: whole, a 1B
    model's tied table (1 GiB in float32) took three GiB of temporaries."""
    return 0.5 * sum(float((f[rows] * (fake_quantize(w[rows], wq, rounding) - w[rows]) ** 2).sum())
                     for rows in row_slices(*w.shape))


def _chunks(captured: CapturedModel, texts: list[str]) -> list[torch.Tensor]:
    """The calibration texts as one token stream, cut into chunks the model's positions allow."""
    ids = [i for text in texts for i in encode(captured.loaded.tokenizer, text + "\n")]
    size = min(CHUNK, captured.loaded.facts.max_positions)
    chunks = [torch.tensor(ids[i:i + size])[None] for i in range(0, len(ids) - 1, size)]
    return [c for c in chunks if c.shape[1] > 1]


def _fisher(model: torch.nn.Module, chunks: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Squared gradients of each chunk's summed next-token loss with respect to `weights`, summed
    over chunks. The model's own parameters are left as they were (no .grad, same requires_grad)."""
    flags = [w.requires_grad for w in weights]
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    table = next((f for w, f in zip(weights, fisher)
                  if isinstance(embedding, torch.nn.Embedding) and w is embedding.weight), None)
    lookups = []

    def add_squared_gradient(f: torch.Tensor):
        def hook(w: torch.Tensor) -> None:
            if f is table:  # its lookup's share comes after backward (_add_table_gradient)
                return
            g = w.grad.float()
            f.addcmul_(g, g)
            w.grad = None
        return hook

    def lookup_as_leaf(module, args, out: torch.Tensor) -> torch.Tensor:
        lookups.append((args, leaf := out.detach().requires_grad_(True)))
        return leaf

    # Each weight's gradient is squared into its sum as soon as backward completes it, then let
    # go: one weight's gradient alive at a time, not the model's (5 GB more on a 1B model).
    hooks = []
    try:
        for w, f in zip(weights, fisher):
            hooks.append(w.requires_grad_(True).register_post_accumulate_grad_hook(add_squared_gradient(f)))
        if table is not None:
            hooks.append(embedding.register_forward_hook(lookup_as_leaf))
        with torch.enable_grad():
            for chunk in chunks:
                logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
                torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").backward()
                if table is not None:
                    _add_table_gradient(embedding, *lookups.pop(), table)
    finally:
        for hook in hooks:
            hook.remove()
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
            w.grad = None
    return fisher


def _add_table_gradient(embedding: torch.nn.Embedding, args: tuple, lookup: torch.Tensor, f: torch.Tensor) -> None:
    """Adds the embedding table's squared gradient to `f`: its lookup's share, taken as the rows the
    chunk looked up (backward through the lookup makes a dense table-sized gradient, and adding it
    to a tied LM head's another: 2 GiB more at a 1B model's 128k x 2048 table), plus the LM head's
    share where the table is tied (its gradient, kept by the hook)."""
    weight, sparse = embedding.weight, embedding.sparse
    embedding.sparse = True
    try:
        (rows,) = torch.autograd.grad(embedding.forward(*args), weight, lookup.grad)  # forward: not the hook
    finally:
        embedding.sparse = sparse
    rows = rows.coalesce()
    index, values = rows.indices()[0], rows.values().float()
    if weight.grad is None:  # untied: the lookup is the table's only use
        f.index_add_(0, index, values ** 2)
        return
    g = weight.grad.float()
    g.index_add_(0, index, values)
    f.addcmul_(g, g)  # in place: g ** 2 would be another table-sized tensor
    weight.grad = None
