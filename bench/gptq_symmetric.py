"""Does data-aware rounding help a symmetric 4-bit grid on the real SmolLM2-135M-Instruct? Issue 15
asks for GPTQ-style rounding; this measures it before building it into a backend.

Simulated in eager torch, weights only (activations stay float): every linear layer but the tied LM
head on the symmetric int4 grid in blocks of 32, with the scales torchao's HQQ search gives (what
ExecuTorch's 8da4w and export_llm store), rounded

- to nearest (what every backend's symmetric grid does), or
- by GPTQ (Frantar et al., 2022) with the same scales: columns are rounded in order and each
  one's error is spread over the columns not yet rounded through the inverse of the layer's input
  Hessian (2·XᵀX on edgepack's built-in calibration text, the precision plan's; dampened by a
  fraction of its mean diagonal).

The tied table is rounded to nearest in every row. Perplexity is edgepack's quality measure (its
built-in evaluation text and windows, bench.quality.eval_text), so the fp32 figure matches
bench/results/quality-smollm2.json's; each row also gives the summed layer error on the calibration
inputs, tr(ΔW·H·ΔWᵀ), which GPTQ minimises. Writes bench/results/gptq-symmetric-smollm2.json.

    python -m bench.gptq_symmetric            # ~4 min on 2 cores (make real-model first)"""

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
DAMPING = (0.01, 0.1)  # GPTQ's usual fraction, and ten times it against a small calibration set


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


def calibration_hessians(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], ids: torch.Tensor) -> dict:
    hessians, hooks = {}, []
    for name, layer in linears.items():
        def record(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + 2 * x.T @ x
        hooks.append(layer.register_forward_hook(record))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {name: h.float() for name, h in hessians.items()}


def perplexity(nll) -> float:
    return math.exp(float(np.concatenate(nll).mean()))


def run(out_dir: Path) -> dict:
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
    texts, source = read_calibration(None)
    ids = torch.tensor([[i for t in texts for i in encode(loaded.tokenizer, t + "\n")]])
    hessians = calibration_hessians(model, linears, ids)
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

    rows = [measure("round to nearest", lambda n: round_to_nearest(floats[n], scales[n]))]
    rows += [measure(f"GPTQ, damping {d}", lambda n, d=d: gptq(floats[n], hessians[n], scales[n], d)) for d in DAMPING]
    report = {
        "model": model_dir.name, "grid": f"symmetric int4 blocks of {BLOCK}, HQQ scales",
        "calibration": {"text": source, "tokens": ids.shape[1]},
        "evaluation": {"text": text.source, "scored_tokens": text.scored_tokens},
        "perplexity_fp32": round(perplexity(text.fp32_nll), 3), "rows": rows,
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("torch", "torchao")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gptq-symmetric-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gptq_symmetric", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
