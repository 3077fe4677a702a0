"""Does a decoder layer lowered as one XNNPACK partition decode faster? Issue 18's first lever, measured.

edgepack's ExecuTorch graph for S135 (bench.models, SmolLM2-135M's shape) splits each layer into
several XNNPACK partitions, because XNNPACK's partitioner rejects four kinds of node there:
slices over the dynamic token dimension (rotate_half, and the shared q/k/v and gate/up linears'
outputs), reshapes whose sizes name that dimension, and RMSNorm's mean over the last dimension of
a 3-D tensor (XNNPACK's mean is 4-D only). This experiment lowers the same weights twice with
edgepack's own steps (bench's settings: symmetric grid, export_llm's, max sequence 512):

- `shipped`: as `edgepack export --executorch-grid symmetric` lowers it (since 2026-12-05 the
  shared linears' outputs and the rotary halves are parted by one split kernel each, not sliced;
  the committed run predates that);
- `whole_layers`: the four rewritten so a layer stays in one partition: rotate_half as a product
  with a constant ±1 matrix (exact), the dynamic size of each reshape inferred (-1), the mean taken
  over a 4-D view, and q/k/v and gate/up kept as separate linears;

and runs them beside ExecuTorch's own export_llm `.pte` of the same weights (bench.run.export_llm),
in one process, interleaved (each round: a 32-token prefill and 64 decode steps per .pte). It
reports delegate calls, lowering time and speeds; writes bench/results/et-partitions-s135.json.

  python -m bench.et_partitions [--work DIR] [--rounds N]      (~35 min on 2 cores; every .pte made anew)"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench.models import build
from bench.run import ROOT, export_llm, git_commit, machine, pte_instructions

MAX_SEQ_LEN, PROMPT_LEN, DECODE_STEPS = 512, 32, 64
VARIANTS = ("shipped", "whole_layers")


def _whole_layer_rewrites():
    """The transform passes and the rotary patch of `whole_layers` (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    import transformers.models.llama.modeling_llama as llama
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    def inferred(shape) -> list | None:
        shape = list(shape)
        dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(dynamic) != 1:
            return None
        shape[dynamic[0]] = -1
        return shape

    class InferDynamicReshape(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op == exir_ops.edge.aten.view_copy.default and (shape := inferred(meta["val"].shape)):
                args = (args[0], shape)
            return super().call_operator(op, args, kwargs, meta)

    class MeanOverFourDims(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op == exir_ops.edge.aten.mean.dim and not kwargs.get("dtype"):
                x = args[0].to_tensor()
                shape = inferred(meta["val"].shape)
                if x.dim() == 3 and [d % 3 for d in args[1]] == [2] and len(args) > 2 and args[2] and shape:
                    x4 = super().call_operator(exir_ops.edge.aten.unsqueeze_copy.default, (args[0], -1), {}, meta)
                    mean = super().call_operator(exir_ops.edge.aten.mean.dim, (x4, [2, 3], True), {}, meta)
                    return super().call_operator(exir_ops.edge.aten.view_copy.default, (mean, shape), {}, meta)
            return super().call_operator(op, args, kwargs, meta)

    def turn_matrix(d: int) -> torch.Tensor:  # x @ turn_matrix.T == rotate_half(x)
        half, m = torch.arange(d // 2), torch.zeros(d, d)
        m[half, half + d // 2], m[half + d // 2, half] = -1.0, 1.0
        return m

    def patch_rotary(module) -> None:
        """rotate_half as a linear with a buffer of `module` (a constant the trace lifts fails
        ExecuTorch's delegate unlifting)."""
        module.register_buffer("turn_matrix", turn_matrix(module.facts.head_dim))

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            turn = lambda x: F.linear(x.reshape(-1, x.shape[-1]), module.turn_matrix).view(x.shape)  # noqa: E731
            return q * cos + turn(q) * sin, k * cos + turn(k) * sin
        llama.apply_rotary_pos_emb = apply_rotary_pos_emb

    return [InferDynamicReshape(), MeanOverFourDims()], patch_rotary


def lower(hf_dir: Path, variant: str, out: Path) -> dict:
    """One variant's .pte written to `out`, with its lowering time (torch.export, to_edge and the
    XNNPACK lowering: the steps the variants change)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.executorch import lower as executorch
    from edgepack.exporters.executorch.options import Options
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    passes = []
    work = executorch._Work(capture(load_source(str(hf_dir), no_tokenizer=True), CaptureOptions(MAX_SEQ_LEN)),
                            QuantSpec.from_options("int4"), Options(grid="symmetric"))
    executorch.take_llm_fast_path(work)
    if variant == "whole_layers":
        passes, patch_rotary = _whole_layer_rewrites()
        patch_rotary(work.module)
        work.module.rotary_families = ()  # its rotary, not the shipped one's split (exporters/rotary.py)
        executorch.share_inputs = lambda module, example_inputs, layers: layers
    executorch.quantize_weights(work)
    start = time.perf_counter()
    executorch.export_program(work)
    work.edge = to_edge_transform_and_lower(work.program, transform_passes=passes, partitioner=[XnnpackPartitioner()],
                                            constant_methods=work.metadata or None)
    lowering_s = time.perf_counter() - start
    executorch.to_pte(work)
    out.write_bytes(next(iter(work.files.values())))
    return {"lowering_s": round(lowering_s, 1)}


def load_methods(paths: dict[str, Path]) -> dict:
    """Each .pte's forward method on ExecuTorch's runtime, the LLM kernel libraries loaded."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::* kernels)
    from executorch.kernels import quantized  # noqa: F401  (embedding_4bit)
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    return {name: runtime.load_program(str(p)).load_method("forward") for name, p in paths.items()}


def prefill_and_decode(method, ids) -> tuple[float, float, list]:
    """The first PROMPT_LEN of `ids` ([1, T]) prefilled in one call, then the rest decoded a token
    a call (teacher-forced): the seconds each part took, and every call's logits."""
    import torch

    start = time.perf_counter()
    rows = [method.execute([ids[:, :PROMPT_LEN], torch.tensor([0])])[0]]
    prefilled = time.perf_counter()
    for pos in range(PROMPT_LEN, ids.shape[1]):
        rows.append(method.execute([ids[:, pos:pos + 1], torch.tensor([pos])])[0])
    return prefilled - start, time.perf_counter() - prefilled, rows


def speeds(paths: dict[str, Path], tokens: np.ndarray, rounds: int) -> tuple[dict, dict]:
    """Tokens per second of each .pte through ExecuTorch's runtime (the LLM kernels loaded), the
    .pte files interleaved within each round so that the host's load falls on all of them, each
    round starting one .pte further on (a .pte's place in the round moves its speed: on the Intel
    host the first of three decoded 2-3 % faster, 2026-12-07); and the logits of each (the
    prompt's last position, then every decode step)."""
    import torch

    methods = load_methods(paths)
    names = list(methods)
    ids = torch.from_numpy(tokens)[None]
    runs = {name: {"prefill_tokens_per_s": [], "decode_tokens_per_s": []} for name in paths}
    logits = {}
    for round_ in range(rounds + 1):  # round 0 warms up and is not counted
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            prefill_s, decode_s, rows = prefill_and_decode(methods[name], ids)
            logits[name] = np.concatenate([r.reshape(1, -1).numpy() for r in rows])
            if round_:
                runs[name]["prefill_tokens_per_s"].append(round(PROMPT_LEN / prefill_s, 1))
                runs[name]["decode_tokens_per_s"].append(round(DECODE_STEPS / decode_s, 1))
    return runs, logits


def run(work: Path, rounds: int) -> dict:
    model = build(work, quick=False)
    paths, lowering = {}, {}
    for variant in VARIANTS:  # each in its own process: the whole-layer rewrites patch transformers
        paths[variant] = work / f"{variant}.pte"
        proc = subprocess.run([sys.executable, "-m", "bench.et_partitions", "--lower", variant, str(model.hf_dir),
                               str(paths[variant])], cwd=ROOT, check=True, capture_output=True, text=True)
        lowering[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    (work / "export_llm").mkdir(exist_ok=True)
    measured, paths["export_llm"] = export_llm(model, work / "export_llm", MAX_SEQ_LEN)
    if measured.returncode:
        raise SystemExit(f"export_llm failed (exit {measured.returncode}); see {measured.log}")
    tokens = np.random.default_rng(0).integers(3, 49152, size=PROMPT_LEN + DECODE_STEPS).astype(np.int64)
    runs, logits = speeds(paths, tokens, rounds)
    median = {name: {m: round(float(np.median(v)), 1) for m, v in r.items()} for name, r in runs.items()}
    report = {
        "model": "s135 (bench.models, random weights)", "prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS,
        "grid": "symmetric (torchao 8da4w g32, HQQ scales), export_llm's flags as in make bench",
        "runs": f"{rounds} interleaved rounds, one warm-up round, one process (executorch.runtime)",
        "instructions_per_forward": {name: pte_instructions(p) for name, p in paths.items()},
        "lowering_s": {name: lowering[name]["lowering_s"] for name in VARIANTS},
        "bytes": {name: p.stat().st_size for name, p in paths.items()},
        # the rewrites change no arithmetic but the mean's summation order, which the int8 activations'
        # rounding amplifies: how far apart that leaves the two
        "whole_layers_logits_max_abs_diff_from_shipped": float(np.abs(logits["whole_layers"] - logits["shipped"]).max()),
        "median": median,
        "decode_vs_export_llm": {name: round(median[name]["decode_tokens_per_s"]
                                             / median["export_llm"]["decode_tokens_per_s"], 3) for name in VARIANTS},
        "runs_tokens_per_s": runs,
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("executorch", "torch", "torchao")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results" / "et-partitions-s135.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("instructions_per_forward", "lowering_s", "median", "decode_vs_export_llm")},
                     indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.et_partitions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-et-partitions"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lower", nargs=3, metavar=("VARIANT", "HF_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lower:
        variant, hf_dir, out = args.lower
        print(json.dumps(lower(Path(hf_dir), variant, Path(out))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    run(args.work, args.rounds)


if __name__ == "__main__":
    main()
