"""What the CLI prints: the export summary, smoke results, a manifest as tables, and doctor.
Every number comes from the run or the manifest; nothing here measures or guesses."""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgepack.exporters.backend import CompanionCheck, function
from edgepack.exporters.registry import BACKENDS
from edgepack.packaging.integration import integration_snippets


def describe_tensors(tensors: list[dict]) -> str:
    """`name: dtype[shape]` for each tensor, in order; tensors alike but for one number in their
    names (a KV cache's two per layer) as one entry where there are three or more numbered 0..n-1:
    `past_key_values.{0..29}.key: float32[...]` instead of thirty lines."""
    def run_of(t: dict) -> tuple[tuple, int] | None:
        numbered = re.fullmatch(r"(\D*)(\d+)(.*)", t["name"])
        return numbered and ((numbered[1], numbered[3], t["dtype"], str(t["shape"])), int(numbered[2]))

    numbered = [(t, run_of(t)) for t in tensors]
    runs: dict[tuple, list[int]] = {}
    for _, run in numbered:
        if run:
            runs.setdefault(run[0], []).append(run[1])
    entries, shown = [], set()
    for t, run in numbered:
        key = run and run[0]
        if key and len(runs[key]) >= 3 and sorted(runs[key]) == list(range(len(runs[key]))):
            if key not in shown:
                shown.add(key)
                entries.append(f"{key[0]}{{0..{len(runs[key]) - 1}}}{key[1]}: {t['dtype']}{t['shape']}")
            continue
        entries.append(f"{t['name']}: {t['dtype']}{t['shape']}")
    return ", ".join(entries)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def export_summary(result) -> dict:
    """The --json summary of one export, measured on this run."""
    manifest = result.bundle.manifest if result.bundle else {}
    fidelity = manifest.get("comparisons", {}).get("lowering_fidelity", {})
    quality = manifest.get("comparisons", {}).get("quantization_quality", {})
    measured = {s.backend: s.memory for s in result.smoke}
    artifacts = []
    for a in manifest.get("artifacts", []):
        artifacts.append({
            "backend": a["backend"], "path": a["path"], "bytes": a["bytes"], "sha256": a["sha256"],
            "ideal_bytes": a["ideal_bytes"], "ratio_to_ideal": round(a["bytes"] / a["ideal_bytes"], 3),
            "lowering_fidelity": fidelity.get(a["backend"]), "quantization_quality": quality.get(a["backend"]),
            # files beside the artifact checked on their own runtime (e.g. the .litertlm on the LiteRT-LM engine)
            "companions": {c.name: fidelity[c.name] for c in _companions(a, fidelity)},
            "memory": a.get("memory"), "smoke_memory": measured.get(a["backend"]) or None,
        })
    text_quality = manifest.get("quality", {}).get("artifacts", {})
    for a in artifacts:
        a["text_quality"] = text_quality.get(a["backend"])
    return {
        "ok": result.exit_code == 0,
        "exit_code": result.exit_code,
        # A failed export's bundle is kept aside (NAME.failed/); NAME/ is never touched by one.
        "bundle": str(result.bundle.path) if result.bundle else None,
        "bundle_passed": result.bundle is not None and result.passed,
        "quality_text": manifest.get("quality", {}).get("text"),
        "warn_increase_pct": manifest.get("quality", {}).get("warn_increase_pct"),
        "archive": str(result.bundle.archive) if result.bundle else None,
        "artifacts": artifacts,
        "failures": result.failures,
        "quality_failures": result.quality_failures,
        "warnings": result.warnings,
        "skipped": result.skipped,
        "stages": [t.as_dict() for t in result.progress.timings],
        "peak_rss_bytes": result.peak_rss_bytes,
        "integration": integration_snippets(manifest) if manifest else None,
        "precision_plans": [{"backends": backends, "plan": plan}
                            for backends, plan in precision_plans(manifest.get("quantization", {}))],
        # the stages taken from the stage cache (edgepack/cache.py) instead of run; None: no cache
        "cache": {"dir": str(result.cache.root), "reused": result.cache.hits} if result.cache.enabled else None,
    }


def precision_plans(quantization: dict) -> list[tuple[list[str] | None, dict]]:
    """The manifest quantization's precision plans, each with the backends that follow it (None:
    every backend)."""
    if quantization.get("plan"):
        return [(None, quantization["plan"])]
    return [(p["backends"], p["plan"]) for p in quantization.get("plans", {}).values() if p.get("plan")]


def describe_plan(plan: dict) -> str:
    """One line on how mixed precision was chosen, from the manifest's quantization.plan."""
    layers, texts = plan["int8_layers"] + plan["int4_layers"], plan["calibration"]["texts"]
    if "budget_bits_per_weight" in plan:  # a decoder LM's plan
        return (f"{plan['int8_layers']} of {layers} layers kept int8 where int4 costs the loss on "
                f"{plan['calibration']['tokens']} calibration tokens most per stored bit: {plan['bits_per_weight']:.2f} "
                f"bits a weight (budget {plan['budget_bits_per_weight']:g}), estimated loss {plan['estimated_loss_planned']:.4f} "
                f"nats/token vs {plan['estimated_loss_all_int4']:.4f} all int4")
    if not plan["int8_layers"]:
        return (f"all {layers} layers int4: {texts} calibration texts already at cosine {plan['planned_min_cosine']:.4f} "
                f">= {plan['target']} from fp32 (floor {plan['floor']} with a margin)")
    return (f"{plan['int8_layers']} of {layers} layers kept int8 ({plan['int4_weight_fraction']:.0%} of the weights int4) "
            f"so that {texts} calibration texts stay >= {plan['target']} from fp32 (floor {plan['floor']} with a margin): "
            f"{plan['planned_min_cosine']:.4f} planned, {plan['all_int4_min_cosine']:.4f} with every layer int4")


def describe_text_quality(q: dict, warn: float | None) -> str:
    """One artifact's perplexity on the evaluation text, as the summary and inspect print it."""
    if "error" in q:
        return f"[red]did not run[/]: {q['error']}"
    if q["perplexity"] is None:
        return f"[bold red]{q['non_finite_steps']} non-finite steps[/] of {q['scored_tokens']}"
    rise = q["increase_pct"]
    style = "bold red" if not q.get("passed", True) else "yellow" if warn is not None and rise > warn else "green"
    return (f"perplexity {q['perplexity']:.2f} vs fp32 {q['perplexity_fp32']:.2f}: [{style}]{rise:+.1f} %[/] "
            f"({q['delta_nats_per_token']:+.3f} nats/token), greedy agreement {q['top1_agreement']:.1%}, "
            f"{q['scored_tokens']} tokens")


def describe_fidelity(fid: dict) -> str:
    """The smoke of one artifact against its quantized reference, in a line."""
    if fid.get("error"):
        return f"[red]FAIL[/]: {fid['error']}"
    cases = fid.get("cases", {})
    parts = ["[green]pass[/]" if fid.get("passed") else "[red]FAIL[/]"]
    for name, m in cases.items():
        if "steps" in m:
            ties = m.get("near_tie_steps") or []
            matched = m["steps"] - len(m.get("top1_mismatches", []))
            parts.append(f"{name}: top-1 matches on {matched} of {m['steps']} steps (teacher-forced)"
                         + (f", near-tie at step {', '.join(map(str, ties))}" if ties else ""))
    parts.append(f"min cosine {_case_summary(cases, 'min_cosine')}, max abs diff {_case_summary(cases, 'max_abs_diff')}")
    failures = [f for m in cases.values() for f in m.get("failures", [])]
    return ", ".join(parts) + ("; " + "; ".join(failures[:3]) if failures else "")


def _companions(artifact: dict, fidelity: dict) -> list[CompanionCheck]:
    """The companion checks that ran on this artifact's bundle (their rows in the smoke results)."""
    return [c for c in BACKENDS[artifact["backend"]].companions
            if artifact["runtime"].get(c.file_key) and c.name in fidelity]


def _case_summary(cases: dict, key: str) -> str:
    values = [m.get(key) for m in cases.values() if m.get(key) is not None]
    return f"{min(values):.4f}" if values else "-"


def describe_memory(memory: dict | None, measured: dict | None) -> str:
    """The memory report: weights and KV cache computed from the artifact, the smoke's RSS measured."""
    if not memory:
        return "-"
    text = f"weights {_mb(memory['weights_bytes'])}"
    kv = memory["kv_cache"]
    if kv:
        text += (f" + KV cache {_mb(kv['bytes_at_max_context'])} at {kv['max_context']:,} tokens "
                 f"({kv['dtype']}, {kv['allocation']}; {_mb(kv['bytes_per_1000_tokens'])} per 1,000 tokens)")
    text += " (computed)"
    if measured:
        text += (f"; the smoke's peak RSS {_mb(measured['peak_rss_bytes'])}, "
                 f"{_mb(measured['peak_rss_bytes'] - measured['rss_before_bytes'])} over the process before it (measured)")
    return text


def _kv_table(title: str) -> Table:
    """Two columns, so nothing is cut on an 80-column terminal or in a CI log."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def print_export_summary(console: Console, summary: dict) -> None:
    for a in summary["artifacts"]:
        fid = a["lowering_fidelity"] or {}
        table = _kv_table(f"{a['backend']} artifact")
        table.add_row("file", a["path"])
        table.add_row("size", f"{_mb(a['bytes'])}  ({a['ratio_to_ideal']:.2f}× the ideal {_mb(a['ideal_bytes'])})")
        table.add_row("smoke vs quantized eager", describe_fidelity(fid))
        table.add_row("memory", describe_memory(a["memory"], a["smoke_memory"]))
        for check in BACKENDS[a["backend"]].companions:
            if check.name in a["companions"]:
                table.add_row(check.label, function(check.describe)(a["companions"][check.name]))
        if a.get("text_quality"):
            table.add_row("quality on text vs fp32", describe_text_quality(a["text_quality"], summary["warn_increase_pct"]))
        else:
            vs_fp32 = {n: m["vs_fp32"] for n, m in fid.get("cases", {}).items() if "vs_fp32" in m}
            table.add_row("quality vs fp32", f"min cosine {_case_summary(vs_fp32, 'min_cosine')} (the artifact on its runtime)"
                          if vs_fp32 else "-")
        console.print(table)
    for p in summary.get("precision_plans") or []:
        whom = f"{', '.join(p['backends'])}: " if p["backends"] else ""
        console.print(f"precision: {whom}{describe_plan(p['plan'])}", soft_wrap=True)
    for f in summary["failures"]:
        where = f" at step {f['step']}" if f["step"] else ""
        console.print(f"[red]{f['backend']} FAILED[/]{where}: {f['message']}", soft_wrap=True)
    times = ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in summary["stages"])
    console.print(f"time: {times}; peak RSS {_mb(summary['peak_rss_bytes'])}", soft_wrap=True)
    if summary["cache"] and summary["cache"]["reused"]:
        console.print(f"cache: reused {', '.join(summary['cache']['reused'])} ({summary['cache']['dir']})",
                      highlight=False, soft_wrap=True)
    for message in summary["skipped"]:
        console.print(f"skipped {message}", soft_wrap=True, highlight=False)
    for message in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    for message in summary["quality_failures"]:
        console.print(f"[bold red]quality gate failed:[/] {message}", soft_wrap=True)
    if summary["bundle"] and summary["bundle_passed"]:
        console.print(f"bundle: {summary['bundle']}", soft_wrap=True)
        print_integration(console, summary["integration"])
    elif summary["bundle"]:
        console.print(f"[red]not written:[/] the failed export is kept for inspection in {summary['bundle']}; "
                      f"an earlier bundle at {summary['bundle'].removesuffix('.failed')} is untouched", soft_wrap=True)
    console.print("[green]OK[/]" if summary["ok"] else f"[red]FAILED[/] (exit {summary['exit_code']})")


def print_integration(console: Console, snippets: dict | None) -> None:
    """The app-side lines that match the bundle's runtimes, ready to paste."""
    if not snippets:
        return
    if snippets["gradle"]:
        console.print("Android, app/build.gradle.kts dependencies:", highlight=False)
        for line in snippets["gradle"]:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    if snippets["swiftpm"]:
        console.print("iOS, Package.swift (the package, then the target's products):", highlight=False)
        for line in snippets["swiftpm"]:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    for note in snippets["notes"]:
        console.print(f"  note: {note}", highlight=False, markup=False, soft_wrap=True)


def print_smoke(console: Console, results) -> None:
    table = Table(title="edgepack smoke", title_justify="left")
    for col in ("backend", "runtime", "case", "result", "tokens", "min cosine", "max abs diff"):
        table.add_column(col)
    for r in results:
        if r.error:
            table.add_row(r.backend, r.runtime, "-", "[red]ERROR[/]", "-", "-", r.error)
        for name, m in r.cases.items():
            verdict = "[green]pass[/]" if not m["failures"] else "[red]FAIL[/] " + "; ".join(m["failures"])
            if "steps_matched" in m:  # free-running on an engine that gives no logits
                tokens = f"{m['steps_matched']}/{m['steps']} greedy (free-running)"
            else:
                tokens = "-" if "steps" not in m else (
                    f"{m['steps'] - len(m.get('top1_mismatches', []))}/{m['steps']} top-1"
                    + (f", near-tie @ {', '.join(map(str, m['near_tie_steps']))}" if m.get("near_tie_steps") else ""))
            table.add_row(r.backend, r.runtime, name, verdict, tokens, str(m.get("min_cosine", "-")), str(m.get("max_abs_diff", "-")))
    console.print(table)


def print_manifest(console: Console, manifest: dict, bundle: Path) -> None:
    model = manifest["model"]
    head = _kv_table(f"bundle {manifest['name']} (manifest schema {manifest['schema_version']})")
    head.add_row("source", f"{model['source']} ({model['source_kind']}, {model['task']})")
    if model.get("hub"):
        head.add_row("hub", f"{model['hub']['repo_id']} at {model['hub']['revision']}: commit {model['hub']['commit']}")
    if model["architecture"]:
        arch = model["architecture"]
        head.add_row("architecture", f"{arch['family']}: {arch['n_layers']} layers, hidden {arch['hidden_size']}, "
                                     f"{arch['n_heads']} heads / {arch['n_kv_heads']} kv, vocab {arch['vocab_size']}")
    head.add_row("parameters", f"{model['parameter_count']:,}")
    stored = model.get("source_quantization")  # absent from bundles written before it was recorded
    if stored:
        head.add_row("source stored as", f"{stored['file_type'] or stored['format']}: " + ", ".join(
            f"{kind} {n['parameters']:,}" for kind, n in stored["tensor_types"].items()))
    tok = manifest["tokenizer"]
    if tok:
        head.add_row("tokenizer", ", ".join(f["path"] for f in tok["files"]))
        head.add_row("bos / eos / pad", f"{tok['bos_id']} / {tok['eos_ids']} / {tok['pad_id']}")
        head.add_row("chat template", "yes" if tok["chat_template"] else "no")
    if manifest["generation"]:
        gen = manifest["generation"]
        head.add_row("max seq len", f"{gen['max_seq_len']} (prefill 1..{gen['prefill_len']['max']}, prepend {gen['num_bos']} BOS)")
    quant = manifest["quantization"]
    head.add_row("quantization", ", ".join(f"{k} {v}" for k, v in quant.items()
                                           if k not in ("overrides", "plan", "plans", "block_fit")))
    for backends, plan in precision_plans(quant):
        head.add_row("precision", (f"{', '.join(backends)}: " if backends else "") + describe_plan(plan))
    if "block_fit" in quant:  # absent where no block was fitted, and from bundles older than the field
        head.add_row("blocks fitted", f"{', '.join(quant['block_fit']['backends'])}: {quant['block_fit']['method']}")
    for plan in [quant, *quant.get("plans", {}).values()]:
        for kind in sorted(set(plan.get("overrides", {}).values())):
            whom = f"{', '.join(plan['backends'])}: " if "backends" in plan else ""
            head.add_row(kind, whom + ", ".join(n for n, k in plan["overrides"].items() if k == kind))
    head.add_row("toolchain", ", ".join(f"{k} {v}" for k, v in manifest["toolchain"].items()))
    console.print(head)
    fidelity = manifest["comparisons"]["lowering_fidelity"]
    for a in manifest["artifacts"]:
        table = _kv_table(f"{a['backend']} artifact")
        table.add_row("path", a["path"])
        table.add_row("size", f"{_mb(a['bytes'])} ({a['bytes'] / a['ideal_bytes']:.2f}× ideal), sha256 {a['sha256'][:16]}…")
        table.add_row("platforms", ", ".join(a["platforms"]))
        runtime = f"{a['runtime']['name']} {a['runtime']['version']}"
        if a["runtime"].get("kernel_libraries"):
            runtime += f" + kernels: {', '.join(a['runtime']['kernel_libraries'])}"
        table.add_row("runtime", runtime)
        if a["quantization"].get("grid"):
            table.add_row("int4 stored as", a["quantization"]["grid"])
        for m in a["methods"]:
            table.add_row(f"method {m['name']}", f"({describe_tensors(m['inputs'])}) -> {describe_tensors(m['outputs'])}")
        for label, text in BACKENDS[a["backend"]].embedded_metadata(bundle / a["path"]):
            table.add_row(f"in file: {label}", text)
        if a["backend"] in fidelity:
            table.add_row("smoke at export", describe_fidelity(fidelity[a["backend"]]))
        if a.get("memory"):  # bundles from before the memory report have none
            table.add_row("memory", describe_memory(a["memory"], None))
        for check in _companions(a, fidelity):
            table.add_row(check.label, function(check.describe)(fidelity[check.name]))
        text = manifest.get("quality", {}).get("artifacts", {}).get(a["backend"])
        if text:
            table.add_row("quality on text", describe_text_quality(text, manifest["quality"]["warn_increase_pct"]))
        console.print(table)
    if manifest.get("quality"):
        t = manifest["quality"]["text"]
        console.print(f"quality measured on {t['source']}: {t['scored_tokens']} tokens in {t['windows']} windows, "
                      f"each after a {t['prefill']}-token prefill; fails above +{manifest['quality']['max_increase_pct']:g} %",
                      soft_wrap=True, highlight=False)
    for f in manifest["failures"]:
        console.print(f"[red]failed:[/] {f['backend']}: {f['message']}", soft_wrap=True)
    verdict = manifest["verdict"]
    console.print("[green]verdict: passed[/]" if verdict["passed"] else "[bold red]verdict: FAILED[/] ("
                  + "; ".join(verdict["failures"]) + ")", soft_wrap=True)
    for w in verdict["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def doctor_report() -> dict:
    def dist_version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    backends = {}
    for entry in BACKENDS.values():
        found = {d: dist_version(d) for d in entry.distributions}
        backends[entry.name] = {"available": all(found.values()), "distributions": found,
                                "artifact": entry.artifact, "platforms": list(entry.platforms)}
    core = {d: dist_version(d) for d in ("torch", "transformers", "tokenizers", "safetensors", "numpy")}
    return {"core": core, "backends": backends}


def print_doctor(console: Console, report: dict) -> None:
    table = Table(title="edgepack doctor", title_justify="left")
    for col in ("component", "status", "versions"):
        table.add_column(col)
    for name, v in report["core"].items():
        table.add_row(name, "[green]ok[/]" if v else "[red]missing[/]", v or "-")
    for name, b in report["backends"].items():
        versions = ", ".join(f"{d} {v or 'missing'}" for d, v in b["distributions"].items())
        table.add_row(f"backend {name}", "[green]ready[/]" if b["available"] else "[red]missing[/]", versions)
    console.print(table)


def _shown(value) -> str:
    """A compared value, short: digests cut, records as key=value with nested ones cut at 60
    characters (--json has them whole)."""
    if isinstance(value, dict):
        def nested(v) -> str:
            text = json.dumps(v, sort_keys=True)
            return text if len(text) <= 60 else text[:59] + "…"
        return ", ".join(f"{k}={nested(v) if isinstance(v, (dict, list)) else _shown(v)}" for k, v in value.items()) or "-"
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    return "-" if value is None else str(value)


def print_diff(console: Console, result: dict) -> None:
    """What changed from OLD to NEW, a row per compared quantity; unchanged ones are counted, not listed."""
    table = Table(title=f"{result['old']} → {result['new']}", title_justify="left")
    for column in ("", "what", "old", "new", "change"):
        table.add_column(column, overflow="fold")
    same = 0
    for c in result["changes"]:
        if c["same"] and not c["regression"]:
            same += 1
            continue
        if c["what"] == "bytes":
            old, new = _mb(c["old"]), _mb(c["new"])
        elif c["note"]:
            old, new = "", c["note"]
        else:
            old, new = _shown(c["old"]), _shown(c["new"])
        change = "" if c["change_pct"] is None else f"{c['change_pct']:+.2f} %"
        table.add_row(c["backend"] or "", c["what"], old, new, f"[red]{change or 'unchecked'}[/]" if c["regression"] else change)
    if table.row_count:
        console.print(table)
    console.print(f"{same} compared quantities unchanged" + ("" if table.row_count else ": no differences"))
    for regression in result["regressions"]:
        console.print(f"[red]regression:[/] {regression}")
    console.print("[green]within bounds[/]" if result["passed"] else "[red]over bounds[/]")


def print_cache_info(console: Console, info: dict) -> None:
    table = Table(title=f"stage cache: {info['dir']}", title_justify="left")
    for column in ("kind", "entries", "size"):
        table.add_column(column)
    for kind, figures in info["kinds"].items():
        table.add_row(kind, str(figures["entries"]), _mb(figures["bytes"]))
    table.add_row("all", str(sum(k["entries"] for k in info["kinds"].values())),
                  f"{_mb(info['bytes'])} (an export prunes to {_mb(info['max_bytes'])})")
    console.print(table)


def print_release(console: Console, records: list[dict]) -> None:
    """export-many's table: one row per export."""
    table = Table(title="edgepack export-many", title_justify="left")
    for column in ("model", "target", "result", "bundle", "artifacts", "time"):
        table.add_column(column)
    for r in records:
        summary = r["summary"]
        result = "[green]OK[/]" if r["exit_code"] == 0 else f"[red]exit {r['exit_code']}[/]"
        problem = (summary.get("error") or {}).get("message") or "; ".join(
            [*(f"{f['backend']}: {f['message']}" for f in summary.get("failures", [])), *summary.get("quality_failures", [])])
        artifacts = ", ".join(f"{a['backend']} {_mb(a['bytes'])}" for a in summary.get("artifacts", []))
        table.add_row(r["name"], r["target"], result + (f": {escape(problem)}" if problem and r["exit_code"] else ""),
                      summary.get("bundle") or "-", artifacts or "-", f"{r['seconds']:.0f} s")
    console.print(table)
