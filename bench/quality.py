"""`make bench-quality`: 4-bit quality on the real SmolLM2-135M-Instruct (`make real-model`), edgepack's
artifacts beside ExecuTorch's own `export_llm`, in one run (about 45 minutes on 2 cores).

- export_llm with the flags `make bench` uses (8da4w, groups of 32, 4-bit embeddings in groups of 32);
- llama.cpp's own path: its convert_hf_to_gguf.py to F16, then its quantizer to Q4_K_M
  (bench/llama_cpp_anchor.py);
- edgepack at its defaults (`--target all`: each int4 grid's precision plan at 5.0 bits a weight),
  `--target executorch --executorch-grid symmetric --mixed-precision off` (every layer int4 on
  export_llm's grid: its size class), and `--target gguf --gguf-type Q4_K_M` (llama.cpp's mix through
  edgepack);
- per artifact: perplexity on the built-in evaluation text through its own runtime (edgepack's
  quality stage; export_llm's .pte through the same measure on the same tokens), the file's bits
  per parameter, its size, and host decode tokens/s (bench.speed; not for CoreML, which has no
  runtime here). Anchors are measured through the same host runtimes on the same tokens.

Writes bench/results/quality-smollm2.json and .png and prints the table docs/quantization.md shows."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from bench.llama_cpp_anchor import MIX, convert_and_quantize
from bench.models import from_hf_dir
from bench.real_model import DEFAULT_OUT, build
from bench.run import ROOT, export_llm, exported_once, git_commit, machine, save_tokens, speed

MAX_SEQ_LEN, PROMPT_LEN, DECODE_STEPS, REPEATS = 512, 32, 64, 3
EXPORT_LLM_ARTIFACT = {"backend": "executorch", "runtime": {"kernel_libraries": ["llm_custom_ops", "quantized"]}}
# What llama.cpp's host adapter reads of an artifact: the context it is loaded with (as edgepack's GGUF).
LLAMA_CPP_ARTIFACT = {"backend": "gguf", "methods": [{"dynamic_dims": {"seq_len": {"min": 1, "max": MAX_SEQ_LEN - 1}}}]}


def eval_text(model_dir: Path):
    """The text edgepack's quality stage scores, tokenized the same way, with fp32's answers."""
    from edgepack.exporters.sources import load_source
    from edgepack.exporters.tokenizer import encode
    from edgepack.packaging import quality

    loaded = load_source(model_dir)
    text, source = quality.read_eval_text(None)
    return quality.prepare_eval_text(loaded.module, lambda t: encode(loaded.tokenizer, t), text, source, MAX_SEQ_LEN)


def anchor_perplexity(model_dir: Path, backend: str, path: Path, artifact: dict) -> dict:
    """An anchor tool's artifact on eval_text, through the runtime edgepack's artifact of that
    backend runs on."""
    from edgepack.exporters.registry import BACKENDS
    from edgepack.packaging import quality

    return quality.measure(BACKENDS[backend].host_call(path, artifact), eval_text(model_dir))


def row(label: str, backend: str, path: Path, size: int, artifact: dict, measured: dict, params: int, tokens: Path,
        work: Path) -> dict:
    entry = {"artifact": label, "backend": backend, "bytes": size, "bits_per_parameter": round(size * 8 / params, 3),
             "perplexity": measured.get("perplexity"), "perplexity_fp32": measured.get("perplexity_fp32"),
             "increase_pct": measured.get("increase_pct"), "top1_agreement": measured.get("top1_agreement")}
    if backend != "coreml":
        runs = speed(backend, path, artifact, tokens, PROMPT_LEN, REPEATS, work)["decode_tokens_per_s"]
        entry["decode_tokens_per_s"] = round(float(np.median(runs)), 1)
    return entry


def run(work: Path, out_dir: Path) -> dict:
    model_dir = build(ROOT / DEFAULT_OUT)
    model = from_hf_dir(model_dir, work / "meta")
    ref_pte = (work / "export_llm" / "model.pte").resolve()
    if not ref_pte.is_file():  # --work keeps finished exports: a rerun measures them again
        ref_pte.parent.mkdir(exist_ok=True)
        ref_export, ref_pte = export_llm(model, ref_pte.parent, MAX_SEQ_LEN)
        if ref_export.returncode:
            raise SystemExit(f"export_llm failed (exit {ref_export.returncode}); see {ref_export.log}")
    tokens = work / "tokens.npy"
    save_tokens(tokens, PROMPT_LEN + DECODE_STEPS)

    gguf = convert_and_quantize(model_dir, work / "llama.cpp")
    rows = [row("export_llm 8da4w g32, embeddings 4,32", "executorch", ref_pte, ref_pte.stat().st_size, EXPORT_LLM_ARTIFACT,
                anchor_perplexity(model_dir, "executorch", ref_pte, EXPORT_LLM_ARTIFACT), model.n_params, tokens, work),
            row(f"llama.cpp convert_hf_to_gguf + quantize {MIX}", "gguf", gguf, gguf.stat().st_size, LLAMA_CPP_ARTIFACT,
                anchor_perplexity(model_dir, "gguf", gguf, LLAMA_CPP_ARTIFACT), model.n_params, tokens, work)]
    # All-int4 loses more than the default gate allows on this model: the gate is lifted to measure it.
    for label, folder, targets, extra in (
            ("edgepack, plan at 5.0 bits a weight (default)", "edgepack-default", "all", []),
            ("edgepack, every layer int4 on the symmetric grid", "edgepack-int4", "executorch",
             ["--executorch-grid", "symmetric", "--mixed-precision", "off", "--max-ppl-increase", "1000"]),
            (f"edgepack --gguf-type {MIX}", "edgepack-q4km", "gguf", ["--gguf-type", MIX])):
        out = work / folder
        manifest = exported_once(model.hf_dir, model.name, out, targets, MAX_SEQ_LEN, PROMPT_LEN, extra=extra)
        for artifact in sorted(manifest["artifacts"], key=lambda a: a["backend"]):
            backend = artifact["backend"]
            rows.append(row(label, backend, out / model.name / artifact["path"], artifact["bytes"], artifact,
                            manifest["quality"]["artifacts"][backend], model.n_params, tokens, work))
    report = {
        "model": {"name": model_dir.name, "parameters": model.n_params, "max_seq_len": MAX_SEQ_LEN,
                  "speed": {"prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS, "repeats": REPEATS}},
        "text": "built-in (edgepack/eval_text.txt)",
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("executorch", "torch", "torchao")}},
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    write_chart(report, out_dir / "quality-smollm2.png")
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["| artifact | backend | size | bits / parameter | perplexity (fp32 {:.2f}) | decode tokens/s |".format(
                 report["rows"][0]["perplexity_fp32"]),
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        speed_ = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "no runtime here"
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['bytes'] / 1e6:.1f} MB | {r['bits_per_parameter']:.2f} | "
                     f"{r['perplexity']:.2f} ({r['increase_pct']:+.1f} %) | {speed_} |")
    return "\n".join(lines)


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in report["rows"]:
        anchor = not r["artifact"].startswith("edgepack")
        label = (r["artifact"].split(" ")[0] + (f" {MIX}" if r["backend"] == "gguf" else "") if anchor
                 else f"edgepack {r['backend']}" + (", all int4" if "int4" in r["artifact"] else "")
                 + (f" {MIX}" if MIX in r["artifact"] else ""))
        # several points nearly coincide (the two Q4_K_M files, the offset grids near 5 bits): a legend, not labels
        ax.scatter(r["bits_per_parameter"], r["increase_pct"], marker="s" if anchor else "o", s=60, alpha=0.8,
                   label=f"{label}: {r['bits_per_parameter']:.2f} bits, {r['increase_pct']:+.1f} %")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("file bits per parameter")
    ax.set_ylabel("perplexity over fp32 (%)")
    ax.set_title(f"{report['model']['name']}: 4-bit artifacts on the built-in text ({report['date']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results", help="results folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="where exports go (default: a temporary folder); exports finished there are reused")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args.work, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="edgepack-bench-quality-") as tmp:
            run(Path(tmp), args.out)


if __name__ == "__main__":
    sys.exit(main())
