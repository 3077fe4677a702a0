"""How fast can a decode step of S135 be on this host's ExecuTorch runtime? The floor under issue 18's
decode target (edgepack's `.pte` ≥ 1.15× export_llm's), measured.

A decode step reads every weight once: on 2 cores that, not the arithmetic, sets its pace. This
lowers only S135's weight reads, the linear layers of all 30 layers (q/k/v as one linear and gate/up
as one, as edgepack stores them; o and down) and the LM head, quantized as both `.pte`s store them
(torchao 8da4w: int4 blocks of 32, bf16 scales, int8 dynamic activations), to one XNNPACK program
with a static one-token input, and times it on ExecuTorch's runtime beside the two full `.pte`s of
a `bench.run` run (`--work DIR`), interleaved in one process. Each round: the full `.pte`s prefill
32 tokens and decode 64 (only the decode is counted); the floor program runs 64 times.

Reported: milliseconds a token for each; what a step costs beyond its linears (attention, norms,
rotary, cache writes, calls between kernels); and the ceiling: export_llm's decode time over the
floor's, the decode ratio edgepack would reach if everything but its linears took no time. Then
where each full `.pte`'s decode step spends its time, from ExecuTorch's own profiler (ETDump, a
separate run: profiling slows each call a little): XNNPACK's GEMMs, the rest of its delegate calls
(other XNNPACK operators and each call's own cost), custom_sdpa, the other kernels, and the
interpreter between them. Writes bench/results/et-decode-floor-s135.json.

  python -m bench.run --executorch-only --work DIR      # the two .pte files (or a full make bench)
  python -m bench.et_decode_floor --work DIR [--pte NAME=PATH ...]    # ~8 min on 2 cores

`--pte` times other `.pte` files of the same weights beside them, e.g. edgepack's default grid
(`edgepack export DIR/s135/hf --target executorch --max-seq-len 512`)."""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench.et_partitions import DECODE_STEPS, PROMPT_LEN, load_methods, prefill_and_decode
from bench.models import S135
from bench.run import ROOT, git_commit, machine, pte_instructions


def decode_linears(shape: dict):
    """A decode step's linear layers and LM head, chained so that none is dead code and each reads
    an input of its real width."""
    import torch
    from torch import nn

    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]

    class DecodeLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict(dict(
                qkv=nn.Linear(hidden, hidden + 2 * kv, bias=False), o=nn.Linear(hidden, hidden, bias=False),
                gate_up=nn.Linear(hidden, 2 * inner, bias=False), down=nn.Linear(inner, hidden, bias=False)))
                for _ in range(shape["num_hidden_layers"]))
            self.head = nn.Linear(hidden, shape["vocab_size"], bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = x + layer["o"](layer["qkv"](x)[..., :hidden])
                x = x + layer["down"](layer["gate_up"](x)[..., :inner])
            return self.head(x)

    torch.manual_seed(0)
    return DecodeLinears().eval(), one_token(shape)


def one_token(shape: dict) -> tuple:
    """The floor program's input: one token's hidden state."""
    import torch

    return (torch.randn(1, 1, shape["hidden_size"], generator=torch.Generator().manual_seed(0)),)


def lower_floor(out: Path) -> dict:
    """The floor program, quantized and delegated with edgepack's own ExecuTorch steps."""
    import torch

    from edgepack.exporters.executorch.lower import delegate_to_xnnpack, quantize_module
    from edgepack.quant import QuantSpec

    module, example = decode_linears(S135)
    quantize_module(module, QuantSpec.from_options("int4"), "symmetric")
    program = torch.export.export(module, example, strict=False)
    out.write_bytes(delegate_to_xnnpack(program, None).to_executorch().buffer)
    return {"bytes": out.stat().st_size, "instructions_per_forward": pte_instructions(out)}


def seconds_per_token(paths: dict[str, Path], floor: Path, rounds: int) -> dict[str, list[float]]:
    """Per round, each full .pte's decode time and the floor program's, a token each, interleaved."""
    import torch

    methods = load_methods({**paths, "floor": floor})
    floor_method = methods.pop("floor")
    ids = torch.from_numpy(np.random.default_rng(0).integers(
        3, S135["vocab_size"], size=PROMPT_LEN + DECODE_STEPS).astype(np.int64))[None]
    x = one_token(S135)
    runs: dict[str, list[float]] = {name: [] for name in [*paths, "floor"]}
    for round_ in range(rounds + 1):  # round 0 warms up and is not counted
        for name, method in methods.items():
            _, decode_s, _ = prefill_and_decode(method, ids)
            if round_:
                runs[name].append(decode_s / DECODE_STEPS)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            floor_method.execute(list(x))
        if round_:
            runs["floor"].append((time.perf_counter() - start) / DECODE_STEPS)
    return runs


def decode_profile(path: Path, steps: int = 96) -> dict:
    """Microseconds a decode step spends in each part, from ETDump: `steps` one-token forwards from
    position 0 (every call a decode step), the mean per call."""
    import tempfile
    from collections import Counter

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::* kernels)
    from executorch.extension.pybindings import portable_lib
    from executorch.kernels import quantized  # noqa: F401  (embedding_4bit)

    module = portable_lib._load_for_executorch(str(path), enable_etdump=True)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(3, S135["vocab_size"], size=steps).astype(np.int64))
    for pos in range(steps):
        module.forward([tokens[None, pos:pos + 1], torch.tensor([pos])])
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/decode.etdump")
        events = [e for block in Inspector(etdump_path=f"{tmp}/decode.etdump").event_blocks
                  for e in block.events if e.perf_data is not None and block.name == "Execute"]
    us: Counter = Counter()
    for e in events:  # perf_data in milliseconds, one entry per call
        us[e.name] += sum(e.perf_data.raw) * 1e3 / steps
    gemm = sum(v for name, v in us.items() if name.startswith("Fully Connected"))
    return {name: round(v, 1) for name, v in {
        "step": us["Method::execute"],
        "xnnpack_gemms": gemm,
        "xnnpack_rest_of_calls": us["DELEGATE_CALL"] - gemm,
        "custom_sdpa": us["llama::custom_sdpa.out"],
        "other_kernels": us["OPERATOR_CALL"] - us["llama::custom_sdpa.out"],
        "between_calls": us["Method::execute"] - us["DELEGATE_CALL"] - us["OPERATOR_CALL"],
    }.items()}


def run(work: Path, rounds: int, extra: dict[str, Path]) -> dict:
    paths = {"export_llm": work / "export_llm" / "model.pte",
             "edgepack": next((work / "edgepack").rglob("*.pte"), work / "edgepack" / "missing.pte"), **extra}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"no .pte at {', '.join(missing)}: run python -m bench.run --executorch-only --work {work} first")
    floor = work / "decode-floor.pte"
    lowered = lower_floor(floor)
    runs = seconds_per_token(paths, floor, rounds)
    profiles = {name: decode_profile(p) for name, p in paths.items()}
    ms = {name: round(float(np.median(r)) * 1e3, 3) for name, r in runs.items()}
    report = {
        "model": "s135 (bench.models, random weights), the .pte files of a bench.run run",
        "what": "milliseconds per decode token (median of rounds, 64 steps each) through executorch.runtime; "
                "floor: only the linear layers and the LM head, one XNNPACK program",
        "ms_per_token": ms,
        "tokens_per_s": {name: round(1e3 / v, 1) for name, v in ms.items()},
        "beyond_linears_ms": {name: round(ms[name] - ms["floor"], 3) for name in paths},
        "decode_vs_export_llm": {name: round(ms["export_llm"] / ms[name], 3) for name in paths if name != "export_llm"},
        "floor_weight_stream_gb_per_s": round(lowered["bytes"] / ms["floor"] / 1e6, 2),
        # what edgepack's decode would be against export_llm's if its step cost only its linears
        "ceiling_vs_export_llm": round(ms["export_llm"] / ms["floor"], 3),
        "decode_step_us_etdump": profiles,
        "floor_pte": lowered,
        "instructions_per_forward": {name: pte_instructions(p) for name, p in paths.items()},
        "rounds": f"{rounds} interleaved rounds after one warm-up round, one process",
        "runs_ms_per_token": {name: [round(v * 1e3, 3) for v in r] for name, r in runs.items()},
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("executorch", "torch", "torchao")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results" / "et-decode-floor-s135.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ms_per_token", "beyond_linears_ms", "floor_weight_stream_gb_per_s",
                                             "decode_vs_export_llm", "ceiling_vs_export_llm", "decode_step_us_etdump")}, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.et_decode_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the --work folder of a bench.run run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pte", action="append", default=[], metavar="NAME=PATH",
                        help="another .pte of S135 to time beside them (e.g. edgepack's default offset grid)")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.pte:
        name, sep, path = item.partition("=")
        if not sep or not name:
            parser.error(f"--pte {item!r}: write it as NAME=PATH")
        extra[name] = Path(path)
    run(args.work, args.rounds, extra)


if __name__ == "__main__":
    main()
