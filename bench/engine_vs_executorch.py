"""The LiteRT-LM engine against ExecuTorch on the same grid: issue 18 asks the engine for 0.8x
ExecuTorch's decode, and `make bench` sets the engine's `.litertlm` (the default offset grid, the
real model) beside a `.pte` on `export_llm`'s symmetric grid (random weights). Here one export of
the real SmolLM2-135M-Instruct writes both files from the same weights and plan, once with the
defaults (the offset grid, the 5.0-bit plan) and once on the symmetric grids with every layer int4
(`export_llm`'s precision; its quality gate is raised to let it through, as bench.litert_torch_anchor
does). Each file decodes a 32-token prompt and 64 steps in its own process (bench.speed: the
ExecuTorch runtime teacher-forced; the engine's own Benchmark at one thread a core), the four
taking turns in each round, the first of a round going last in the next. Writes
bench/results/engine-vs-executorch-smollm2.json.

  python -m bench.engine_vs_executorch [--rounds 5] [--work DIR]      (~20 min on 2 cores)"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench.real_model import DEFAULT_OUT, build
from bench.run import ROOT, exported_once, git_commit, machine, save_tokens, taking_turns
from bench.speed import ENGINE_THREADS

MAX_SEQ_LEN, PROMPT, DECODE, REPEATS = 512, 32, 64, 3
GRIDS = {"default": [],
         "symmetric_int4": ["--tflite-grid", "symmetric", "--executorch-grid", "symmetric", "--mixed-precision", "off",
                            "--max-ppl-increase", "100"]}


def exported(model_dir: Path, work: Path, grid: str) -> dict[str, tuple[Path, dict]]:
    """{"executorch" / "litertlm": (file, its manifest entry)} of one export of both backends."""
    out = work / grid
    manifest = exported_once(model_dir, "smollm2", out, "tflite,executorch", MAX_SEQ_LEN, PROMPT,
                             extra=["--tflite-bundle", "litertlm", *GRIDS[grid]])
    by_backend = {a["backend"]: a for a in manifest["artifacts"]}
    tflite = by_backend["tflite"]
    return {"executorch": (out / "smollm2" / by_backend["executorch"]["path"], by_backend["executorch"]),
            "litertlm": (out / "smollm2" / tflite["runtime"]["litertlm"], tflite)}


def run(rounds: int, work: Path) -> dict:
    model_dir = build(ROOT / DEFAULT_OUT)
    files = {(grid, runtime): entry for grid in GRIDS for runtime, entry in exported(model_dir, work, grid).items()}
    tokens = work / "tokens.npy"
    save_tokens(tokens, PROMPT + DECODE)
    # the same tokens for every file: the ExecuTorch runtime is teacher-forced on them, the engine
    # (which takes no token values) decodes as many
    speeds = taking_turns({key: (key[1], *entry) for key, entry in files.items()}, tokens, PROMPT, rounds, REPEATS, work)
    runs = {key: {"prefill": [round(float(x), 1) for x in s["prefill_tokens_per_s"]],
                  "decode": [round(float(x), 1) for x in s["decode_tokens_per_s"]]} for key, s in speeds.items()}
    rows = {grid: {runtime: {"bytes": files[(grid, runtime)][0].stat().st_size,
                             "decode_tokens_per_s": statistics.median(runs[(grid, runtime)]["decode"]),
                             "prefill_tokens_per_s": statistics.median(runs[(grid, runtime)]["prefill"]),
                             "runs": runs[(grid, runtime)]} for runtime in ("executorch", "litertlm")}
            for grid in GRIDS}
    for row in rows.values():
        row["engine_decode_vs_executorch"] = round(row["litertlm"]["decode_tokens_per_s"]
                                                   / row["executorch"]["decode_tokens_per_s"], 3)
    report = {"model": model_dir.name, "max_seq_len": MAX_SEQ_LEN, "prompt_tokens": PROMPT, "decode_tokens": DECODE,
              "rounds": f"{rounds}, each file {REPEATS} counted runs after a warm-up in its own process",
              "engine_threads": ENGINE_THREADS, "flags": GRIDS, "rows": rows, "machine": machine(),
              "versions": {"edgepack": git_commit(), "executorch": version("executorch"),
                           "litert-lm-api": version("litert-lm-api"), "ai-edge-litert": version("ai-edge-litert")},
              "date": time.strftime("%Y-%m-%d")}
    (ROOT / "bench" / "results" / "engine-vs-executorch-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({grid: {"executorch": row["executorch"]["decode_tokens_per_s"], "litertlm": row["litertlm"]["decode_tokens_per_s"],
                             "ratio": row["engine_decode_vs_executorch"]} for grid, row in rows.items()}, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_vs_executorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="where the exports go (kept and reused when given)")
    args = parser.parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args.rounds, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="edgepack-engine-vs-et-") as work:
            run(args.rounds, Path(work))


if __name__ == "__main__":
    main()
