"""edgepack's ONNX beside onnxruntime-genai's own model builder, the anchor an ONNX Runtime user would
pick (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`, blocks of 32), on the real
SmolLM2-135M-Instruct, edgepack's by default (the offset grid), on the builder's own symmetric
grid with its precision plan, and on that grid with every layer int4 as the builder's (like for
like): every folder through onnxruntime-genai's generator (bench.speed genai), the same
prompt and teacher-forced tokens, runs interleaved so the host's load falls on all; the file
sizes beside the ideal; each graph's node count; and the perplexity of each on edgepack's built-in
evaluation text through ONNX Runtime, by packaging.quality.measure (edgepack's own export measured
it; the builder's model is driven here with its attention mask and past). Writes
bench/results/ort-genai-smollm2.json.

  python -m bench.ort_genai_anchor [--work DIR] [--rounds N]      (~20 min on 2 cores)"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench.quality import DECODE_STEPS, MAX_SEQ_LEN, PROMPT_LEN, REPEATS, eval_text
from bench.real_model import DEFAULT_OUT, build
from bench.run import ROOT, exported_once, git_commit, machine, save_tokens

# edgepack's folders: the default (the offset grid), the builder's own grid (symmetric blocks) with
# the precision plan, and without it (every layer int4, as the builder stores them)
EDGEPACK = {"edgepack": [], "edgepack_symmetric": ["--onnx-grid", "symmetric"],
            "edgepack_symmetric_int4": ["--onnx-grid", "symmetric", "--mixed-precision", "off"]}
LIKE_BUILDER = "edgepack_symmetric_int4"  # the same layers int4 in the same blocks: the builder's ideal size


def builder(hf_dir: Path, out: Path) -> Path:
    """onnxruntime-genai's builder output for `hf_dir` in `out` (kept when already there)."""
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache"),
                        "--extra_options", "int4_block_size=32"], check=True, capture_output=True, text=True)
    return out


def genai_speed(folder: Path, tokens: Path, work: Path) -> dict:
    out = work / f"genai-{folder.parent.name}.npz"
    subprocess.run([sys.executable, "-m", "bench.speed", "genai", str(folder), "{}", str(tokens), str(PROMPT_LEN),
                    str(REPEATS), str(out)], check=True, cwd=ROOT)
    data = np.load(out)
    return {k: data[k].tolist() for k in data.files}


def builder_call(model: Path):
    """The builder's model behind quality.measure's forward(tokens [1, T], input_pos [1]) ->
    logits [1, vocab]: its attention mask over every position so far, its past growing (plain ONNX
    Runtime, so the past and present are separate buffers), a new cache at position 0."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pasts = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    decoder = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    outputs = [o.name for o in session.get_outputs()]
    cache: dict[str, np.ndarray] = {}

    def forward(_: str, args: list[np.ndarray]) -> list[np.ndarray]:
        tokens, position = args[0], int(args[1][0])
        if position == 0:
            cache.update(dict.fromkeys(pasts, empty))
        feed = {"input_ids": tokens, "attention_mask": np.ones((1, position + tokens.shape[1]), np.int64), **cache}
        result = dict(zip(outputs, session.run(outputs, feed)))
        cache.update({p: result[p.replace("past_key_values.", "present.")] for p in pasts})
        return [result["logits"][:, -1]]
    return forward


def builder_perplexity(hf_dir: Path, model: Path) -> dict:
    """quality.measure of the builder's model on the text and tokens edgepack's export scores."""
    from edgepack.packaging import quality

    return quality.measure(builder_call(model), eval_text(hf_dir))


def node_count(model: Path) -> int:
    import onnx

    return len(onnx.load(str(model), load_external_data=False).graph.node)


def run(work: Path, rounds: int) -> dict:
    hf_dir = build(ROOT / DEFAULT_OUT)
    manifests = {name: exported_once(hf_dir, "smollm2", work / name, "onnx", MAX_SEQ_LEN, PROMPT_LEN, extra=extra)
                 for name, extra in EDGEPACK.items()}
    ideal = {name: m["artifacts"][0]["ideal_bytes"] for name, m in manifests.items()}
    ideal["builder"] = ideal[LIKE_BUILDER]
    folders = {**{name: work / name / "smollm2" / "onnx" for name in EDGEPACK},
               "builder": builder(hf_dir, work / "builder" / "model")}
    tokens = work / "tokens.npy"
    save_tokens(tokens, PROMPT_LEN + DECODE_STEPS)
    runs: dict[str, dict[str, list]] = {k: {"prefill_tokens_per_s": [], "decode_tokens_per_s": []} for k in folders}
    for _ in range(rounds):  # interleaved: a busy moment slows both, not one
        for name, folder in folders.items():
            for metric, values in genai_speed(folder, tokens, work).items():
                runs[name][metric] += values
    sizes = {name: sum(p.stat().st_size for p in folder.glob("model.onnx*")) for name, folder in folders.items()}
    keys = ("perplexity", "perplexity_fp32", "increase_pct", "top1_agreement", "scored_tokens", "text_sha256")
    quality = {**{name: {k: m["quality"]["artifacts"]["onnx"][k] for k in keys} for name, m in manifests.items()},
               "builder": {k: v for k, v in builder_perplexity(hf_dir, folders["builder"] / "model.onnx").items() if k in keys}}
    median = {name: {m: round(float(np.median(v)), 1) for m, v in r.items()} for name, r in runs.items()}
    # Each round's own ratio (its runs' median over the builder's in the same round): how far the
    # host's load moves the ratio within one run.
    by_round = {name: {m: [round(float(np.median(v[i:i + REPEATS]) / np.median(runs["builder"][m][i:i + REPEATS])), 3)
                           for i in range(0, len(v), REPEATS)] for m, v in runs[name].items()} for name in EDGEPACK}
    report = {
        "model": hf_dir.name, "prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS,
        "runs": f"{rounds} interleaved rounds of {REPEATS} per folder, one warm-up each (bench.speed genai)",
        "builder": "python -m onnxruntime_genai.models.builder -p int4 -e cpu --extra_options int4_block_size=32",
        "edgepack": {name: " ".join(["edgepack export --target onnx", *extra]) for name, extra in EDGEPACK.items()},
        "bytes": sizes, "ideal_bytes": ideal,
        "size_vs_ideal": {name: round(size / ideal[name], 3) for name, size in sizes.items()},
        "nodes": {name: node_count(folder / "model.onnx") for name, folder in folders.items()},
        "quality": quality,
        "median": median,
        "ratios": {name: {m: round(median[name][m] / median["builder"][m], 3) for m in median[name]} for name in EDGEPACK},
        "ratios_by_round": by_round,
        "runs_tokens_per_s": runs,
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("onnxruntime", "onnxruntime-genai")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results" / "ort-genai-smollm2.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("bytes", "size_vs_ideal", "nodes", "quality", "median", "ratios", "ratios_by_round")},
                     indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ort_genai_anchor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-ort-genai"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    run(args.work, args.rounds)


if __name__ == "__main__":
    main()
