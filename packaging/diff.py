"""Two bundles side by side, as release CI compares one model release with the last: each
artifact's size, perplexity, cosines and golden tokens, the source weights, the toolchain and the
settings; and whether NEW stays within the caller's bounds on size and perplexity.

Every number is read from the two manifests and the bundles' own smoke files, after each bundle
is checked against its file index (a tampered bundle is refused, not compared)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.packaging.bundle import read_bundle


@dataclass(frozen=True)
class Change:
    """One compared quantity. `regression` says which bound NEW breaks, or why it cannot be checked."""

    what: str
    backend: str | None
    old: Any
    new: Any
    change_pct: float | None = None
    regression: str | None = None
    note: str | None = None  # what changed, in words, where the values are long (tokens)

    @property
    def same(self) -> bool:
        return self.old == self.new


@dataclass(frozen=True)
class Bounds:
    max_size_increase_pct: float | None = None
    max_ppl_increase_pct: float | None = None


def _pct(old: float, new: float) -> float:
    return round((new - old) / old * 100, 2)


def _artifacts(manifest: dict) -> dict[str, dict]:
    return {a["backend"]: a for a in manifest["artifacts"]}


def _min_cosine(cases: dict | None) -> float | None:
    found = [c["min_cosine"] for c in (cases or {}).values() if c.get("min_cosine") is not None]
    return min(found) if found else None


def _tokens(bundle: Path, manifest: dict, who: str) -> dict[str, list[int]]:
    """The golden cases' expected tokens of `who` (a backend's quantized reference, or fp32-eager)."""
    return {case["name"]: np.load(bundle / case["expected"][who]["tokens"]["path"]).reshape(-1).tolist()
            for case in manifest["smoke"]["cases"] if "tokens" in case["expected"].get(who, {})}


def _tokens_change(what: str, backend: str | None, old: dict, new: dict) -> Change:
    """Golden tokens per case; the note says where each changed case first parts."""
    def parted(a: list[int] | None, b: list[int] | None) -> str:
        if a is None or b is None:
            return "only in OLD" if b is None else "only in NEW"
        return f"differ from step {next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}"

    notes = [f"{name}: {parted(old.get(name), new.get(name))}" for name in sorted({*old, *new}) if old.get(name) != new.get(name)]
    return Change(what, backend, old, new, note="; ".join(notes) or None)


def _size(backend: str, old: dict, new: dict, bounds: Bounds) -> Change:
    pct = _pct(old["bytes"], new["bytes"])
    broken = bounds.max_size_increase_pct is not None and pct > bounds.max_size_increase_pct
    return Change("bytes", backend, old["bytes"], new["bytes"], pct,
                  f"{backend}: {pct:+.2f} % size, over --max-size-increase {bounds.max_size_increase_pct:g}" if broken else None)


def _perplexity(backend: str, old: dict, new: dict, bounds: Bounds) -> Change | None:
    """Perplexity through the artifact's runtime, compared only on the same evaluation text."""
    a, b = old.get("artifacts", {}).get(backend), new.get("artifacts", {}).get(backend)
    bound = bounds.max_ppl_increase_pct
    if a is None and b is None:
        return None
    if a is None or b is None or a["text_sha256"] != b["text_sha256"]:
        why = "measured in one bundle only" if a is None or b is None else "measured on different evaluation texts"
        return Change("perplexity", backend, a and a["perplexity"], b and b["perplexity"],
                      regression=f"{backend}: perplexity {why}, so --max-ppl-increase cannot be checked" if bound is not None else None)
    pct = _pct(a["perplexity"], b["perplexity"])
    broken = bound is not None and pct > bound
    return Change("perplexity", backend, a["perplexity"], b["perplexity"], pct,
                  f"{backend}: perplexity {pct:+.2f} %, over --max-ppl-increase {bound:g}" if broken else None)


def _artifact_changes(backend: str, old: tuple[Path, dict], new: tuple[Path, dict], bounds: Bounds) -> list[Change]:
    (old_dir, om), (new_dir, nm) = old, new
    a, b = _artifacts(om)[backend], _artifacts(nm)[backend]
    changes = [_size(backend, a, b, bounds), Change("sha256", backend, a["sha256"], b["sha256"])]
    ppl = _perplexity(backend, om.get("quality") or {}, nm.get("quality") or {}, bounds)
    changes += [ppl] if ppl else []
    fidelity_a, fidelity_b = om["comparisons"]["lowering_fidelity"][backend], nm["comparisons"]["lowering_fidelity"][backend]
    changes.append(Change("min cosine vs fp32", backend, _min_cosine(om["comparisons"]["quantization_quality"].get(backend)),
                          _min_cosine(nm["comparisons"]["quantization_quality"].get(backend))))
    changes.append(Change("smoke min cosine", backend, _min_cosine(fidelity_a["cases"]), _min_cosine(fidelity_b["cases"])))
    changes.append(Change("smoke passed", backend, fidelity_a["passed"], fidelity_b["passed"]))
    changes.append(_tokens_change("golden tokens", backend, _tokens(old_dir, om, backend), _tokens(new_dir, nm, backend)))
    return changes


def _keyed(what: str, old: dict, new: dict) -> Change:
    """A record's keys whose values differ, each side's values under them (None on both: the same)."""
    changed = [k for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    return Change(what, None, {k: old.get(k) for k in changed} or None, {k: new.get(k) for k in changed} or None)


def diff_bundles(old_dir: Path, new_dir: Path, bounds: Bounds = Bounds()) -> dict:
    om, nm = read_bundle(old_dir), read_bundle(new_dir)
    old_weights = {w["name"]: w["sha256"] for w in om["model"]["weight_files"]}
    new_weights = {w["name"]: w["sha256"] for w in nm["model"]["weight_files"]}
    changes = [
        Change("source", None, om["model"]["source"], nm["model"]["source"]),
        Change("source weights", None, old_weights, new_weights),
        _tokens_change("fp32 golden tokens", None, _tokens(old_dir, om, "fp32-eager"), _tokens(new_dir, nm, "fp32-eager")),
    ]
    old_art, new_art = _artifacts(om), _artifacts(nm)
    for backend in sorted({*old_art, *new_art}):
        if backend in old_art and backend in new_art:
            changes += _artifact_changes(backend, (old_dir, om), (new_dir, nm), bounds)
            continue
        checked = bounds.max_size_increase_pct is not None or bounds.max_ppl_increase_pct is not None
        gone = backend not in new_art
        changes.append(Change("artifact", backend, old_art.get(backend, {}).get("path"), new_art.get(backend, {}).get("path"),
                              regression=f"{backend}: in OLD, not in NEW, so its bounds cannot be checked" if gone and checked else None))
    changes += [_keyed("quantization", om["quantization"], nm["quantization"]),
                _keyed("generation", om["generation"] or {}, nm["generation"] or {}),
                _keyed("toolchain", om["toolchain"], nm["toolchain"])]
    regressions = [c.regression for c in changes if c.regression]
    return {"old": str(old_dir), "new": str(new_dir), "bounds": asdict(bounds),
            "changes": [{**asdict(c), "same": c.same} for c in changes],
            "regressions": regressions, "passed": not regressions}
