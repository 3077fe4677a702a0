"""edgepack's MNN beside MNN's converter alone, on the real SmolLM2-135M-Instruct: the same fp32 ONNX
graph (edgepack's capture, the KV-cache convention) given to MNN's converter with its own 4-bit
block flags (asymmetric, blocks of 32, fp16 scales), without edgepack's rounding on the offset
grid or its packed 4-bit embedding table. Both through MNN's runtime (the same host adapter),
perplexity on the built-in text and file size. Writes bench/results/mnn-anchor-smollm2.json.

  python -m bench.mnn_anchor [--work DIR]      (~15 min on 2 cores)"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

from bench.quality import MAX_SEQ_LEN, anchor_perplexity
from bench.real_model import DEFAULT_OUT, build
from bench.run import ROOT, exported_once, git_commit, machine


def converter_only(model_dir: Path, out: Path) -> Path:
    """MNN's converter on the unrounded fp32 graph, every linear layer at its 4-bit flags (as an MNN
    user converting an ONNX export would), written to `out`/model.mnn (kept when already there)."""
    from edgepack.exporters.capture import CaptureOptions, capture
    from edgepack.exporters.lowering import Step, run_steps
    from edgepack.exporters.mnn import lower as mnn
    from edgepack.exporters.mnn.options import Options
    from edgepack.exporters.sources import load_source
    from edgepack.quant import QuantSpec

    path = out / "model.mnn"
    if path.is_file():
        return path

    def keep_fp32_weights(work) -> None:
        work.module = work.captured.module

    steps = (Step("check", mnn.check_scheme), Step("fp32 weights", keep_fp32_weights), Step("export", mnn.export),
             Step("convert", mnn.convert))
    captured = capture(load_source(str(model_dir)), CaptureOptions(max_seq_len=MAX_SEQ_LEN))
    work = run_steps("mnn", steps, mnn._Work(captured, QuantSpec.from_options("int4"), Options()))
    out.mkdir(parents=True, exist_ok=True)
    path.write_bytes(work.data)
    (out / "converter.json").write_text(json.dumps(work.converter) + "\n")
    return path


def run(work: Path) -> dict:
    model_dir = build(ROOT / DEFAULT_OUT)
    manifest = exported_once(model_dir, "smollm2", work / "edgepack", "mnn", MAX_SEQ_LEN, 32)
    [artifact] = manifest["artifacts"]
    anchor = converter_only(model_dir, work / "converter-only")
    # the same graph signature: the anchor runs through the adapter with edgepack's method description
    measured = anchor_perplexity(model_dir, "mnn", anchor, artifact)
    ideal = artifact["ideal_bytes"]
    rows = {
        "edgepack": {"bytes": artifact["bytes"], "vs_ideal": round(artifact["bytes"] / ideal, 3),
                     **{k: manifest["quality"]["artifacts"]["mnn"][k] for k in ("perplexity", "perplexity_fp32", "increase_pct")}},
        "converter only": {"bytes": anchor.stat().st_size, "vs_ideal": round(anchor.stat().st_size / ideal, 3),
                           **{k: measured[k] for k in ("perplexity", "perplexity_fp32", "increase_pct")},
                           "flags": json.loads((anchor.parent / "converter.json").read_text())["flags"]},
    }
    report = {"model": model_dir.name, "text": "built-in (edgepack/eval_text.txt)", "ideal_bytes": ideal, "rows": rows,
              "machine": machine(), "versions": {"edgepack": git_commit(), "mnn": version("mnn")},
              "date": time.strftime("%Y-%m-%d")}
    (ROOT / "bench" / "results" / "mnn-anchor-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mnn_anchor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-mnn-anchor"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    run(args.work)


if __name__ == "__main__":
    main()
