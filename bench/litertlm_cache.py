"""How the KV cache's length (`--max-seq-len`) sets TFLite's decode speed on the LiteRT-LM engine:
the real SmolLM2-135M-Instruct exported with a .litertlm at several cache lengths (the defaults
otherwise), each decoded on the engine's own Benchmark (32 prefill and 64 decode tokens, the
lengths measured in interleaved rounds after a warm-up round). The .tflite's static cache is
read whole at every step, whatever the position. Writes bench/results/litertlm-cache-smollm2.json.

  python -m bench.litertlm_cache [--lengths 128,512,2048] [--rounds 6] [--work DIR]   (~25 min on 2 cores)"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench.real_model import DEFAULT_OUT, build
from bench.run import ROOT, exported_once, git_commit, machine
from bench.speed import engine_backend

PROMPT, DECODE = 32, 64


def engine_rounds(paths: dict, rounds: int) -> dict:
    """{key: {"prefill"/"decode": tokens/s per counted round}} for {key: .litertlm path}, the files run
    in turn within each round so that the host's drift falls on all alike; round 0 warms up and is
    not counted."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    runs = {key: {"prefill": [], "decode": []} for key in paths}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-litertlm-cache-") as caches:
        for round_ in range(rounds + 1):
            for key, path in paths.items():
                cache = Path(caches) / str(key)  # each model's compiled weight cache
                cache.mkdir(exist_ok=True)
                result = litert_lm.Benchmark(str(path), engine_backend(), prefill_tokens=PROMPT,
                                             decode_tokens=DECODE, cache_dir=str(cache)).run()
                if (result.last_prefill_token_count, result.last_decode_token_count) != (PROMPT, DECODE):
                    raise SystemExit(f"the LiteRT-LM engine ran other token counts than asked: {result}")
                if round_:
                    runs[key]["prefill"].append(round(result.last_prefill_tokens_per_second, 1))
                    runs[key]["decode"].append(round(result.last_decode_tokens_per_second, 1))
    return runs


def engine_rows(paths: dict, rounds: int, reference, ratio: str) -> dict:
    """{key: size, median prefill and decode tokens/s, decode against `reference`'s (as `ratio`), and
    every counted round} for {key: .litertlm path}, measured by engine_rounds."""
    runs = engine_rounds(paths, rounds)
    rows = {key: {"litertlm_bytes": path.stat().st_size,
                  "prefill_tokens_per_s": statistics.median(runs[key]["prefill"]),
                  "decode_tokens_per_s": statistics.median(runs[key]["decode"]), "runs": runs[key]}
            for key, path in paths.items()}
    for row in rows.values():
        row[ratio] = round(row["decode_tokens_per_s"] / rows[reference]["decode_tokens_per_s"], 3)
    return rows


def exported_litertlm(model_dir: Path, out: Path, max_seq_len: int, extra: list[str] | tuple = ()) -> tuple[Path, dict]:
    """(the .litertlm, the manifest) of edgepack's export of `model_dir` into `out` (bench.run.exported_once)."""
    manifest = exported_once(model_dir, "smollm2", out, "tflite", max_seq_len, PROMPT,
                             extra=["--tflite-bundle", "litertlm", *extra])
    [artifact] = manifest["artifacts"]
    return out / "smollm2" / artifact["runtime"]["litertlm"], manifest


def run(lengths: list[int], rounds: int, work: Path) -> dict:
    model_dir = build(ROOT / DEFAULT_OUT)
    paths = {}
    for length in lengths:
        print(f"edgepack export --target tflite --tflite-bundle litertlm --max-seq-len {length}", flush=True)
        paths[length], _ = exported_litertlm(model_dir, work / f"len{length}", length)
    rows = engine_rows(paths, rounds, reference=min(lengths), ratio="decode_vs_shortest")
    report = {"model": model_dir.name, "prompt_tokens": PROMPT, "decode_tokens": DECODE,
              "rounds": f"{rounds} interleaved after a warm-up round", "rows": rows, "machine": machine(),
              "versions": {"edgepack": git_commit(), "litert-lm-api": version("litert-lm-api"),
                           "ai-edge-litert": version("ai-edge-litert")},
              "date": time.strftime("%Y-%m-%d")}
    (ROOT / "bench" / "results" / "litertlm-cache-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("decode_tokens_per_s", "decode_vs_shortest", "prefill_tokens_per_s")}
                      for k, v in rows.items()}, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.litertlm_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512,2048", help="the --max-seq-len values, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-litertlm-cache"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    run(sorted(int(x) for x in args.lengths.split(",")), args.rounds, args.work)


if __name__ == "__main__":
    main()
