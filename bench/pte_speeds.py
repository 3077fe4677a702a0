"""Prefill and decode speed of `.pte` files of one model, side by side: interleaved in one process
on ExecuTorch's runtime (bench.et_partitions.speeds: each round a 32-token prefill and 64
teacher-forced decode steps per .pte, a warm-up round not counted), so that this shared host's
drift falls on all of them. Reports each .pte's median tokens/s, its delegate and kernel calls a
forward, and, against each .pte named after it, the median of the per-round ratios and the rounds
it was faster in: the measure the docs quote for a change of one lowering step.

  python -m bench.pte_speeds --rounds 60 --out RESULT.json NAME=PATH NAME=PATH ...   (~2 s a round)

e.g. a default export beside the one of the commit before and export_llm's `.pte` of the same
weights (bench.run, `make bench-quality`'s work folder)."""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench.et_partitions import DECODE_STEPS, PROMPT_LEN, speeds
from bench.run import git_commit, machine, pte_instructions


def compare(paths: dict[str, Path], rounds: int, vocab: int) -> dict:
    """Each .pte's speeds and calls, and each against every .pte named after it, round by round."""
    tokens = np.random.default_rng(0).integers(0, vocab, PROMPT_LEN + DECODE_STEPS).astype(np.int64)
    runs, logits = speeds(paths, tokens, rounds)
    names = list(paths)
    report = {}
    for i, name in enumerate(names):
        entry = {"pte": str(paths[name]), "bytes": paths[name].stat().st_size, **pte_instructions(paths[name]),
                 "runs": runs[name], **{f"median_{m}": float(np.median(v)) for m, v in runs[name].items()}}
        entry["vs"] = {}
        for other in names[i + 1:]:
            vs = entry["vs"][other] = {"max_abs_logits_diff": float(np.abs(logits[name] - logits[other]).max())}
            for metric, per_round in runs[name].items():
                ratio = np.array(per_round) / np.array(runs[other][metric])
                vs[metric] = {"median_of_rounds": round(float(np.median(ratio)), 3),
                              "faster_in": int((ratio > 1).sum()), "rounds": rounds}
        report[name] = entry
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ptes", nargs="+", metavar="NAME=PATH", help="the .pte files, each compared with those after it")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this (SmolLM2's)")
    parser.add_argument("--out", type=Path, required=True, help="the results file (JSON)")
    args = parser.parse_args(argv)
    paths = {name: Path(path) for name, path in (item.split("=", 1) for item in args.ptes)}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "versions": {"edgepack": git_commit(), "executorch": version("executorch")},
              "prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS, "ptes": compare(paths, args.rounds, args.vocab)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in report["ptes"].items():
        print(f"{name}: decode {entry['median_decode_tokens_per_s']:.1f} tokens/s, prefill "
              f"{entry['median_prefill_tokens_per_s']:.1f}, {entry['delegate_calls']} delegate calls")
        for other, vs in entry["vs"].items():
            decode, prefill = vs["decode_tokens_per_s"], vs["prefill_tokens_per_s"]
            print(f"  vs {other}: decode {decode['median_of_rounds']}x (faster in {decode['faster_in']} of "
                  f"{decode['rounds']} rounds), prefill {prefill['median_of_rounds']}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
