"""The benchmark's chart: edgepack / export_llm ratios against issue 18's targets, and .pte sizes
against the ideal 4-bit size."""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "decode_tokens_per_s": "decode tok/s\n(higher is better)",
    "prefill_tokens_per_s": "prefill tok/s\n(higher is better)",
    "export_wall_s": "export time\n(lower is better)",
    "export_peak_rss_bytes": "export peak RSS\n(lower is better)",
}


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = report["ratios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    names = list(LABELS)
    values = [ratios[n]["ratio"] for n in names]
    colors = ["tab:green" if ratios[n]["met"] else "tab:red" for n in names]
    left.bar(range(len(names)), values, color=colors)
    for i, name in enumerate(names):
        bound = float(ratios[name]["target"].split()[-1])
        left.hlines(bound, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        left.text(i, values[i], f"{values[i]:.2f}×", ha="center", va="bottom")
    left.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
    left.set_ylabel("edgepack / export_llm")
    left.set_title("ratios (dashed: target)")

    et = report["executorch"]
    model = report["model"]
    bars = {"ideal (tied once)": model["ideal_bytes"], "ideal (untied)": model["ideal_bytes_untied"],
            "export_llm .pte": et["export_llm"]["pte_bytes"], "edgepack .pte": et["edgepack"]["pte_bytes"]}
    right.bar(range(len(bars)), [b / 1e6 for b in bars.values()], color=["grey", "lightgrey", "tab:blue", "tab:orange"])
    right.set_xticks(range(len(bars)), list(bars), rotation=20, fontsize=8)
    right.set_ylabel("MB")
    right.set_title(".pte size")
    fig.suptitle(f"{model['name']}: edgepack vs ExecuTorch export_llm on {report['machine']['cores']} cores "
                 f"({report['date']}, edgepack {report['versions']['edgepack']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
