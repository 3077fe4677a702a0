"""Does data-aware rounding help a symmetric 4-bit grid on the real SmolLM2-135M-Instruct? Issue 15
asks for GPTQ or AWQ-style rounding; this measures both before building either into a backend.

Simulated in eager torch, weights only (activations stay float): every linear layer but the tied LM
head on the symmetric int4 grid in blocks of 32, with the scales torchao's HQQ search gives (what
ExecuTorch's 8da4w and export_llm store), rounded

- to nearest (what every backend's symmetric grid does), or
- by GPTQ (Frantar et al., 2022) with the same scales: columns are rounded in order and each
  one's error is spread over the columns not yet rounded through the inverse of the layer's input
  Hessian (2·XᵀX on edgepack's built-in calibration text, the precision plan's, in chunks of
  512 tokens; dampened by a fraction of its mean diagonal), or
- after AWQ's scaling (Lin et al., 2023): the layers that read one input (q/k/v after a norm,
  gate/up after a norm, down after up's rows) have their input channels multiplied by s = m^α,
  m each channel's mean magnitude on the calibration text, α searched on a grid per group for the
  smallest error of the group's outputs, and the reader's input divided by s (foldable into the
  norm's weight or up's rows, so the float model is unchanged). The weights here are simulated as
  Q(W·s)/s, which in float is the folded model exactly. The attention output projection is left
  alone: with grouped-query attention its input is not one value row per channel.

The tied table is rounded to nearest in every row. Perplexity is edgepack's quality measure (its
built-in evaluation text and windows, bench.quality.eval_text), so the fp32 figure matches
bench/results/quality-smollm2.json's; each row also gives the summed layer error on the calibration
inputs, tr(ΔW·H·ΔWᵀ), which GPTQ minimises. Writes bench/results/rounding-symmetric-smollm2.json
(with `--calibration FILE` or `--skip N`, the file's stem and N in the name).

    python -m bench.rounding_symmetric            # ~5 min on 2 cores (make real-model first)
    python -m bench.rounding_symmetric --calibration edgepack/eval_text.txt   # a diagnostic only:
        # calibrated on the very text it is scored on, the most any calibration set could give"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.quality import eval_text
from bench.real_model import DEFAULT_OUT
from bench.run import ROOT, git_commit, machine

BLOCK, QMIN, QMAX = 32, -8, 7
DAMPING = (0.01, 0.1)  # GPTQ's usual fraction, and ten times it
CHUNK = 512  # calibration tokens a forward pass
MAX_TOKENS = 8192  # each layer's inputs are held in memory: about 3 GB at this many
ALPHAS = [i / 20 for i in range(20)]  # AWQ's grid; α = 0 is rounding to nearest


def hqq_scales(weight: torch.Tensor) -> torch.Tensor:
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    _, scale = _choose_qparams_and_quantize_scale_only_hqq(weight, [1, BLOCK], QMIN, QMAX)
    return scale.float().repeat_interleave(BLOCK, dim=1)


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (weight / scale).round().clamp(QMIN, QMAX) * scale


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, damping: float, step: int = 128) -> torch.Tensor:
    """The weight rounded column by column on the fixed grid `scale`, each column's error carried
    into the columns after it (the reference algorithm, in blocks of `step` columns)."""
    w, h = weight.clone(), hessian.clone()
    dead = torch.diag(h) == 0  # inputs never active: nothing to fit
    h[dead, dead], w[:, dead] = 1.0, 0.0
    h += torch.eye(h.shape[0]) * damping * torch.diag(h).mean()
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for start in range(0, w.shape[1], step):
        end = min(start + step, w.shape[1])
        part, errors, inv = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start), inverse[start:end, start:end]
        for i in range(end - start):
            column = round_to_nearest(part[:, i:i + 1], scale[:, start + i:start + i + 1])[:, 0]
            out[:, start + i] = column
            errors[:, i] = (part[:, i] - column) / inv[i, i]
            part[:, i:] -= errors[:, i:i + 1] * inv[i:i + 1, i:]
        w[:, end:] -= errors @ inverse[start:end, end:]
    return out


def awq_scales(weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """AWQ's input-channel scales for the layers in `weights`, which all read `x` [tokens, channels]:
    the α of ALPHAS whose scaled rounding Q(W·s)/s gives their outputs the smallest squared error."""
    magnitude = x.abs().mean(0).clamp(min=1e-6)
    reference = [x @ w.T for w in weights]
    best = (math.inf, torch.ones_like(magnitude), 0.0)
    for alpha in ALPHAS:
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = sum((x @ awq_rounded(w, s).T - r).pow(2).sum().item() for w, r in zip(weights, reference))
        best = min(best, (error, s, alpha), key=lambda b: b[0])
    return best[1], best[2]


def awq_rounded(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    scaled = weight * s
    return round_to_nearest(scaled, hqq_scales(scaled)) / s


def awq_groups(model: torch.nn.Module) -> list[list[str]]:
    """Each group's layers read one input whose channels AWQ may scale (Llama's layout)."""
    groups = []
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        groups += [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                   [p + "mlp.gate_proj", p + "mlp.up_proj"], [p + "mlp.down_proj"]]
    return groups


def calibration_inputs(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], ids: list[int], skip: int) -> dict:
    """Each linear layer's inputs [tokens, channels] on `ids` in chunks of CHUNK tokens, without
    the first `skip` positions of each chunk (the first is the attention sink, whose inputs carry
    much of the calibration error: docs/limits.md). Layers that read one tensor (q/k/v, gate/up)
    share one result."""
    inputs, hooks, seen = {n: [] for n in linears}, [], {}
    for name, layer in linears.items():
        def record(module, args, output, name=name):
            # the tensor is held until the chunk ends, so that no later one can take its id
            if id(args[0]) not in seen:
                seen[id(args[0])] = (args[0], args[0][0, skip:].detach().clone())
            inputs[name].append(seen[id(args[0])][1])
        hooks.append(layer.register_forward_hook(record))
    with torch.no_grad():
        for start in range(0, len(ids), CHUNK):
            model(input_ids=torch.tensor([ids[start:start + CHUNK]]))
            seen.clear()
    for hook in hooks:
        hook.remove()
    return shared_per_input(inputs, torch.cat, key=lambda parts: tuple(map(id, parts)))


def shared_per_input(per_layer: dict, compute: Callable, key: Callable = id) -> dict:
    """`compute(value)` for each layer's value, once for the layers whose values have one key."""
    results = {}
    for value in per_layer.values():
        if key(value) not in results:
            results[key(value)] = compute(value)
    return {n: results[key(value)] for n, value in per_layer.items()}


def perplexity(nll) -> float:
    return math.exp(float(np.concatenate(nll).mean()))


def run(out_dir: Path, calibration: Path | None, skip: int) -> dict:
    from edgepack.exporters.mixed_precision import read_calibration
    from edgepack.exporters.sources import load_source
    from edgepack.exporters.tokenizer import encode
    from edgepack.packaging.quality import score_in_eager

    model_dir = ROOT / DEFAULT_OUT
    text = eval_text(model_dir)
    loaded = load_source(str(model_dir))
    model = loaded.module.float().eval()
    table = model.get_input_embeddings().weight
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight is not table}
    texts, source = read_calibration(calibration)
    ids = [i for t in texts for i in encode(loaded.tokenizer, t + "\n")][:MAX_TOKENS]
    inputs = calibration_inputs(model, linears, ids, skip)
    hessians = shared_per_input(inputs, lambda x: (2 * x.double().T @ x.double()).float())
    floats = {n: m.weight.detach().clone() for n, m in linears.items()}
    scales = {n: hqq_scales(w) for n, w in floats.items()}
    with torch.no_grad():
        table.copy_(round_to_nearest(table, hqq_scales(table.detach())))

    def measure(label: str, rounded: Callable[[str], torch.Tensor]) -> dict:
        started = time.perf_counter()
        error = 0.0
        with torch.no_grad():
            for name, layer in linears.items():
                layer.weight.copy_(rounded(name))
                delta = layer.weight - floats[name]
                error += torch.einsum("ij,jk,ik->", delta, hessians[name], delta).item()
        seconds = time.perf_counter() - started
        nll, _ = score_in_eager(model, text.windows, text.prefill)
        entry = {"rounding": label, "perplexity": round(perplexity(nll), 3),
                 "calibration_error": round(error, 1), "rounding_s": round(seconds, 1)}
        print(entry, flush=True)
        return entry

    def nearest(name: str) -> torch.Tensor:
        return round_to_nearest(floats[name], scales[name])

    rows = [measure("round to nearest", nearest)]
    rows += [measure(f"GPTQ, damping {d}", lambda n, d=d: gptq(floats[n], hessians[n], scales[n], d)) for d in DAMPING]
    started, awq, alphas = time.perf_counter(), {}, []
    for group in awq_groups(model):
        s, alpha = awq_scales([floats[n] for n in group], inputs[group[0]])
        awq.update({n: awq_rounded(floats[n], s) for n in group})
        alphas.append(alpha)
    search_s = time.perf_counter() - started
    rows.append(measure("AWQ scaling, then round to nearest", lambda n: awq[n] if n in awq else nearest(n)))
    rows[-1].update({"search_s": round(search_s, 1), "alpha_mean": round(sum(alphas) / len(alphas), 3),
                     "groups_scaled": sum(a > 0 for a in alphas), "groups": len(alphas)})
    report = {
        "model": model_dir.name, "grid": f"symmetric int4 blocks of {BLOCK}, HQQ scales",
        "calibration": {"text": source, "tokens": len(ids), "chunk": CHUNK, "skipped_per_chunk": skip},
        "evaluation": {"text": text.source, "scored_tokens": text.scored_tokens},
        "perplexity_fp32": round(perplexity(text.fp32_nll), 3), "rows": rows,
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("torch", "torchao")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "rounding-symmetric-smollm2" + (f"-{calibration.stem}" if calibration else "") + (f"-skip{skip}" if skip else "")
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rounding_symmetric", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--calibration", type=Path, help="one text per line (default: edgepack's built-in texts)")
    parser.add_argument("--skip", type=int, default=0,
                        help="positions left out of each chunk's statistics (default 0; 1 leaves the attention sink out)")
    args = parser.parse_args()
    run(args.out, args.calibration, args.skip)


if __name__ == "__main__":
    main()
