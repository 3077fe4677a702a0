"""How export cost grows with model size (issue 18's scale part): random-weight Llamas of three real
models' shapes, each exported by `edgepack export` as a user runs it (default options, no tokenizer,
max sequence 512, its own smoke test included) to each backend in its own process, measuring the
wall time, each stage's time and the process tree's peak RSS against the model's fp32 weight bytes;
ExecuTorch's export_llm on the largest as the reference. Writes bench/results/scale.json and
scale.png.

  python -m bench.scale [--sizes s135,s360,l1b] [--targets executorch,onnx,tflite,mnn] [--work DIR]
                        [--no-export-llm] [--tokenizer DIR] [--out FILE]

With --tokenizer (a model folder's tokenizer files, e.g. build/smollm2-135m-instruct) the models
carry it, as a real model does, so the export also runs the decoder precision plan and the quality
stage (perplexity through the artifact): what a real model's export costs, not the lowering's alone.
  python -m bench.scale --merge REPORT... [--out FILE]   (partial runs' reports as one, with its chart)
  make bench BENCH_ARGS=--scale         (all of it: an hour or more on 2 cores; not in CI)"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench.models import S135, build_shape
from bench.run import ROOT, edgepack_export, export_llm, git_commit, machine

SHAPES = {
    "s135": S135,  # SmolLM2-135M
    "s360": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5),  # SmolLM2-360M
    "l1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8),  # Llama-3.2-1B
}
TARGETS = ("executorch", "onnx", "tflite", "mnn")
MAX_SEQ_LEN = 512
RSS_BOUND = 2.5  # issue 18: peak RSS at most 2.5x the fp32 weight bytes


def export_row(measured, summary: dict, manifest: dict, fp32_bytes: int) -> dict:
    return {
        "exit_code": measured.returncode,
        "wall_s": round(measured.wall_s, 1),
        "peak_rss_bytes": measured.peak_rss_bytes,
        "peak_rss_vs_fp32_weights": round(measured.peak_rss_bytes / fp32_bytes, 2),
        "stages": {s["name"]: {"seconds": s["seconds"], "peak_rss_bytes": s.get("peak_rss_bytes"),
                               "steps": s.get("steps", {}), "step_peak_rss_bytes": s.get("step_peak_rss_bytes", {})}
                   for s in summary.get("stages", [])},
        "artifact_bytes": sum(a["bytes"] for a in manifest.get("artifacts", [])),
        "log": measured.log,
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def run(sizes: list[str], targets: list[str], work: Path, with_export_llm: bool,
        out: Path = ROOT / "bench" / "results" / "scale.json", tokenizer: Path | None = None) -> dict:
    rows: dict[str, dict] = {}
    for size in sizes:
        largest = size == sizes[-1]
        model = _built(work, size, meta=with_export_llm and largest)
        for name in TOKENIZER_FILES if tokenizer else ():
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, model.hf_dir / name)
        fp32_bytes = model.n_params * 4
        rows[size] = {"params_tied_once": model.n_params, "fp32_weight_bytes": fp32_bytes, "exports": {}}
        for target in targets:
            print(f"{size}: edgepack export --target {target}", flush=True)
            measured, summary, manifest = edgepack_export(model.hf_dir, size, work / f"{size}-{target}", target,
                                                          MAX_SEQ_LEN, 32, tokenizer=tokenizer is not None)
            rows[size]["exports"][target] = export_row(measured, summary, manifest, fp32_bytes)
        if with_export_llm and largest:
            print(f"{size}: export_llm", flush=True)
            measured, pte = export_llm(model, work / f"{size}-export_llm", MAX_SEQ_LEN)
            rows[size]["exports"]["export_llm (executorch)"] = {
                **export_row(measured, {}, {}, fp32_bytes), "artifact_bytes": pte.stat().st_size if pte.is_file() else 0}
        _free(work / size)
    report = {
        "what": "edgepack export (default options, "
                + (f"{tokenizer.name}'s tokenizer, so the precision plan and quality stage included"
                   if tokenizer else "--no-tokenizer") +
                ", --max-seq-len 512, smoke test included) per backend in its own process; wall time and the "
                "process tree's peak RSS (wait4)",
        "ran": {"sizes": sizes, "targets": targets, "export_llm": with_export_llm},  # a partial run says so
        "rss_bound_vs_fp32_weights": RSS_BOUND,
        "shapes": {size: SHAPES[size] for size in sizes},
        "sizes": rows,
        "machine": machine(),
        "versions": {"edgepack": git_commit(), **{p: version(p) for p in ("executorch", "torch", "onnxruntime",
                                                                         "litert-torch")}},
        "date": time.strftime("%Y-%m-%d"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_chart(report, out.with_suffix(".png"))
    print(markdown(report))
    return report


def _built(work: Path, size: str, meta: bool):
    """build_shape in a child process. Built here, a 1B model raises this process's peak RSS to
    10.6 GiB, and each export it then starts inherits that peak as its own (getrusage's ru_maxrss
    and wait4's, through vfork and exec): every backend read 10.6 GiB at 1B."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build_shape, (work, size, SHAPES[size]), {"meta": meta})


def merge(paths: list[Path], out: Path) -> dict:
    """One report, and one chart, from the reports of partial runs (each size and backend as its
    latest given report measured it; each export row names the report it came from)."""
    reports = [(path, json.loads(path.read_text())) for path in paths]
    sizes: dict[str, dict] = {}
    for path, report in reports:
        for size, row in report["sizes"].items():
            merged = sizes.setdefault(size, {**row, "exports": {}})
            merged["exports"].update({t: {**e, "report": path.name} for t, e in row["exports"].items()})
    order = [s for s in SHAPES if s in sizes]
    latest = max(reports, key=lambda r: r[1]["date"])[1]
    report = {
        "what": latest["what"],
        "merged_from": [{"report": path.name, "ran": r.get("ran"), "date": r["date"],
                         "edgepack": r["versions"]["edgepack"], "machine": r["machine"]} for path, r in reports],
        "rss_bound_vs_fp32_weights": RSS_BOUND,
        "shapes": {size: SHAPES[size] for size in order},
        "sizes": {size: sizes[size] for size in order},
        "machine": latest["machine"],
        "date": latest["date"],
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_chart(report, out.with_suffix(".png"))
    print(markdown(report))
    return report


def _free(model_dir: Path) -> None:
    """The random model's files (gigabytes for l1b) go once its exports are done."""
    import shutil

    shutil.rmtree(model_dir, ignore_errors=True)


def markdown(report: dict) -> str:
    lines = ["| model | params | backend | exit | wall | peak RSS | RSS / fp32 weights |", "|---|---|---|---|---|---|---|"]
    for size, row in report["sizes"].items():
        for target, e in row["exports"].items():
            lines.append(f"| {size} | {row['params_tied_once'] / 1e6:.0f}M | {target} | {e['exit_code']} | "
                         f"{e['wall_s'] / 60:.1f} min | {e['peak_rss_bytes'] / 2**30:.2f} GiB | "
                         f"{e['peak_rss_vs_fp32_weights']}× |")
    return "\n".join(lines)


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    backends = sorted({t for row in report["sizes"].values() for t in row["exports"]})
    for backend in backends:  # an export that failed or was refused is no point on a cost curve
        points = [(row["params_tied_once"] / 1e6, row["exports"][backend]) for row in report["sizes"].values()
                  if row["exports"].get(backend, {}).get("exit_code") == 0]
        if not points:
            continue
        x = [p for p, _ in points]
        left.plot(x, [e["wall_s"] / 60 for _, e in points], marker="o", label=backend)
        right.plot(x, [e["peak_rss_bytes"] / 2**30 for _, e in points], marker="o", label=backend)
    x = [row["params_tied_once"] / 1e6 for row in report["sizes"].values()]
    right.plot(x, [RSS_BOUND * row["fp32_weight_bytes"] / 2**30 for row in report["sizes"].values()],
               linestyle="dashed", marker="_", markersize=14, color="black", label=f"{RSS_BOUND}× fp32 weights")
    for axis in (left, right):  # from zero, with room above the bound (one size is one point per line)
        axis.set_ylim(0, axis.get_ylim()[1] * 1.1)
    left.set(xlabel="parameters (M)", ylabel="export wall time (min)", title="export time")
    right.set(xlabel="parameters (M)", ylabel="peak RSS (GiB)", title="export peak RSS")
    left.legend(), right.legend()
    fig.suptitle(f"edgepack export cost by model size ({report['date']}, {report['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}, smallest first")
    parser.add_argument("--targets", default=",".join(TARGETS), help="'' for export_llm alone")
    parser.add_argument("--work", type=Path, default=None, help="where models and exports go (default: a temporary folder)")
    parser.add_argument("--no-export-llm", action="store_true", help="skip export_llm on the largest size")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="give the models DIR's tokenizer (the plan and quality stages then run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json",
                        help="the JSON (the chart beside it as .png)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                        help="instead of measuring: join these reports of partial runs into --out and its chart")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    sizes, targets = args.sizes.split(","), [t for t in args.targets.split(",") if t]  # '' : export_llm alone
    unknown = [s for s in sizes if s not in SHAPES] + [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown size or target: {', '.join(unknown)}")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run(sizes, targets, args.work, not args.no_export_llm, args.out, args.tokenizer)
    else:
        with tempfile.TemporaryDirectory(prefix="edgepack-scale-") as work:
            run(sizes, targets, Path(work), not args.no_export_llm, args.out, args.tokenizer)


if __name__ == "__main__":
    main()
