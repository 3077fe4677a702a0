"""The whole export, in order: check → load → capture → plan precision (models with a tokenizer at
int4) → lower (per backend; decoder LMs: the backends on the offset grid after fp32's perplexity and
the fit of that grid's blocks to the calibration text) → package → smoke → quality (decoder LMs:
perplexity on text) → commit (to NAME/ when everything passed, else to NAME.failed/).
No stage here knows a backend by name; backends come from the registry. The plan, each lowering and
each perplexity are kept in the stage cache (edgepack/cache.py) and taken from it when an export
repeats them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgepack.cache import StageCache, digest, model_digest, tool_digest
from edgepack.errors import (
    EXIT_FAILED,
    EXIT_OK,
    CaptureAltered,
    EdgepackError,
    InputError,
    TokenizerMismatch,
    no_space,
    write_error,
)
from edgepack.exporters.capture import CaptureOptions, capture
from edgepack.exporters.decoder_precision import BLOCK_FIT, check_budget, fit_offset_blocks, plan_decoder_precision
from edgepack.exporters.lowering import lower
from edgepack.exporters.mixed_precision import DEFAULT_FLOOR, plan_mixed_precision, read_calibration
from edgepack.exporters.registry import DEFAULT_TARGET, resolve_targets, target_names
from edgepack.exporters.sources import load_source
from edgepack.exporters.tokenizer import encode
from edgepack.packaging import quality
from edgepack.packaging.bundle import StagedBundle, check_bundle_name, check_writable, commit, stage_contents
from edgepack.packaging.smoke import BackendSmoke, smoke_bundle
from edgepack.progress import Progress
from edgepack.quant import QuantSpec
from edgepack.rss import peak_rss_bytes
from edgepack.stages import Artifact, Bundle

MIXED_PRECISION = ("auto", "off")


@dataclass(frozen=True)
class ExportRequest:
    source: str
    targets: str = DEFAULT_TARGET
    out_dir: Path = Path("dist")
    name: str | None = None
    quant: str = "int4"
    group_size: int = 32
    max_seq_len: int | None = None
    min_cosine: float | None = None
    strict: bool = False
    no_tokenizer: bool = False
    pooling: str = "none"
    # At int4, "auto" (None: the default) keeps the costliest layers int8: for encoders until the
    # calibration texts' outputs clear the floor (--min-cosine, else 0.99) with a margin
    # (exporters/mixed_precision.py), for decoder LMs within a bits-per-weight budget
    # (exporters/decoder_precision.py); "off" stores all int4.
    mixed_precision: str | None = None
    calibration: Path | None = None
    bits_per_weight: float | None = None
    # Decoder LMs: the perplexity rise over fp32 (percent) that fails the export, and the text it
    # is measured on (None: the built-in text).
    max_ppl_increase: float | None = None
    eval_text: Path | None = None
    # backend name -> its options as typed (e.g. {"coreml": {"ios_target": 17}}); each backend
    # validates its own part, and only the backends asked for are consulted.
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cache_dir: Path | None = None  # the stage cache (None: nothing is reused or kept)

    def check(self) -> None:
        """Every option's value and range, before anything is loaded (exit 2)."""
        if self.name is not None:
            check_bundle_name(self.name)
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise InputError(f"--max-seq-len {self.max_seq_len} must be at least 2",
                             hint="leave it out for min(the model's max positions, 2048)")
        if self.min_cosine is not None and not (math.isfinite(self.min_cosine) and 0 < self.min_cosine <= 1):
            raise InputError(f"--min-cosine {self.min_cosine} must be a number in (0, 1]", hint="e.g. 0.99")
        if self.max_ppl_increase is not None and not (math.isfinite(self.max_ppl_increase) and self.max_ppl_increase >= 0):
            raise InputError(f"--max-ppl-increase {self.max_ppl_increase} must be a percentage >= 0",
                             hint=f"e.g. 20 (the default is {quality.DEFAULT_MAX_INCREASE_PCT:g})")
        if self.bits_per_weight is not None and not math.isfinite(self.bits_per_weight):
            raise InputError(f"--bits-per-weight {self.bits_per_weight} must be a number",
                             hint=f"e.g. {quality.DEFAULT_BITS_PER_WEIGHT:g} (the default)")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise InputError(f"--mixed-precision {self.mixed_precision!r} is not a choice",
                             hint=f"choose one of {', '.join(MIXED_PRECISION)}")


@dataclass
class ExportResult:
    bundle: Bundle | None
    artifacts: list[Artifact]
    failures: list[dict]
    smoke: list[BackendSmoke]
    progress: Progress
    peak_rss_bytes: int = 0
    quality_failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # backends of --target all that cannot take this model
    cache: StageCache = field(default_factory=lambda: StageCache(None))

    @property
    def passed(self) -> bool:
        return not self.failures and not self.quality_failures and all(s.passed for s in self.smoke)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.bundle is not None and self.passed else EXIT_FAILED


def _failure(error: EdgepackError, backend: str) -> dict:
    return {"backend": backend, "step": error.step, "message": str(error)}


def tokenizer_warnings(loaded, *, strict: bool) -> list[str]:
    """A runner tokenizer that disagrees with the model's is a warning, or a failure under --strict."""
    check = loaded.tokenizer.runner_check if loaded.tokenizer else {}
    if not check.get("mismatches"):
        return list(loaded.tokenizer.warnings) if loaded.tokenizer else []
    first = check["mismatches"][0]
    if first["what"] == "load":
        message = f"the on-device runner's tokenizer ({check['runner']}) cannot load tokenizer.json: {first['error']}"
    else:
        message = (f"the on-device runner's tokenizer ({check['runner']}) differs from the model's on "
                   f"{len(check['mismatches'])} of {check['texts']} check texts; first: {first['what']} of {first['text'][:40]!r}")
    if strict:
        raise TokenizerMismatch(message, hint="see tokenizer.runner_check in the manifest (without --strict the bundle is written with this warning)")
    return [*loaded.tokenizer.warnings, message]


def artifact_warnings(artifact: Artifact, *, strict: bool) -> list[str]:
    """What a backend found wrong but not fatal in its artifact (e.g. its runtime's tokenizer
    disagreeing with the model's): a warning, or a failure under --strict."""
    if artifact.warnings and strict:
        raise TokenizerMismatch(f"{artifact.backend}: {artifact.warnings[0]}",
                                hint="without --strict the bundle is written with this warning")
    return [f"{artifact.backend}: {w}" for w in artifact.warnings]


def calibrated(loaded, quant: QuantSpec) -> str | None:
    """What calibration text serves ("encoder" or "decoder"), or None: models with a tokenizer (the
    calibration text is text) at int4. Encoders plan precision with it; decoder LMs plan precision
    and fit the offset grid's blocks to it."""
    return PLAN_BY_TASK.get(loaded.task) if loaded.tokenizer is not None and quant.scheme == "int4" else None


def plans_precision(request: ExportRequest, loaded, quant: QuantSpec) -> str | None:
    """Which precision plan the export makes ("encoder" or "decoder"), unless turned off. An option
    asked for where it cannot apply is refused rather than ignored."""
    kind = calibrated(loaded, quant)
    asked = [option for option, given in (("--calibration", request.calibration is not None),
                                          ("--bits-per-weight", request.bits_per_weight is not None),
                                          ("--mixed-precision auto", request.mixed_precision == "auto")) if given]
    if asked and kind is None:
        raise InputError(
            f"{asked[0]} applies to models with a tokenizer at --quant int4; this is a {loaded.task} "
            f"{'without a tokenizer ' if loaded.tokenizer is None else ''}at --quant {quant.scheme}",
            hint="drop the option")
    if "--bits-per-weight" in asked and kind != "decoder":
        raise InputError(f"--bits-per-weight applies to decoder LMs; {loaded.source} is a {loaded.task}",
                         hint="encoders plan for a quality floor instead (--min-cosine)")
    # a decoder LM's calibration text also fits the offset grid's blocks, plan or no plan
    planning = [option for option in asked if not (option == "--calibration" and kind == "decoder")]
    if request.mixed_precision == "off" and planning:
        raise InputError(f"{planning[0]} plans mixed precision, and --mixed-precision off turns it off",
                         hint="drop one of the two")
    return kind if request.mixed_precision != "off" else None


PLAN_BY_TASK = {"encoder": "encoder", "causal-lm": "decoder"}


def backends_for(backends: list, loaded, quant: QuantSpec, targets: str,
                 max_seq_len: int | None = None) -> tuple[list, list[str]]:
    """The backends that take this model (a decoder LM: at a cache of max_seq_len), and why the
    others do not. A backend named in --target that cannot take it is an input error; under
    --target all it is left out, and said so."""
    refused = {b.name: reason for b in backends if (reason := b.refuses(loaded, quant, max_seq_len))}
    if refused and target_names(targets) != ["all"]:
        name, reason = next(iter(refused.items()))
        raise InputError(f"--target {name}: {reason}", hint=f"leave {name} out of --target")
    return [b for b in backends if b.name not in refused], [f"{name}: {reason}" for name, reason in refused.items()]


def export(request: ExportRequest, progress: Progress) -> ExportResult:
    try:
        return _export(request, progress)
    except Exception as e:
        full = no_space(e)
        if full is None:
            raise
        # A full disk is nobody's bug: say where it happened, whichever stage met it.
        file = Path(str(full.filename)) if full.filename else None
        out = request.out_dir.resolve()
        where = (f"the bundle to {request.out_dir}" if file is None or file.resolve().is_relative_to(out)
                 else f"{file} (a converter's working file)")
        raise write_error(full, where) from e


def _export(request: ExportRequest, progress: Progress) -> ExportResult:
    # Everything the user typed is checked before the first slow step. Validating a backend's
    # options imports its converter, whose import-time chatter is captured like a stage's output.
    request.check()
    backends = resolve_targets(request.targets)
    capture_options = CaptureOptions(request.max_seq_len, request.pooling)
    with progress.captured("check"):
        options = {b.name: b.validated_options(request.backend_options.get(b.name, {})) for b in backends}
    unused = {b: sorted(o) for b, o in request.backend_options.items() if o and b not in options}
    if unused:
        raise InputError(
            "; ".join(f"{b} options ({', '.join(keys)}) were given but --target does not include {b}" for b, keys in unused.items()),
            hint="add the backend to --target or drop its options")
    quant = QuantSpec.from_options(request.quant, request.group_size)
    calibration = read_calibration(request.calibration) if request.calibration else None  # a bad file fails now
    if request.bits_per_weight is not None and quant.scheme == "int4":
        check_budget(quant, request.bits_per_weight)
    eval_text = quality.read_eval_text(request.eval_text)
    check_writable(request.out_dir)

    with progress.stage("load"):
        loaded = load_source(request.source, name=request.name, no_tokenizer=request.no_tokenizer)
    quant.check_model(loaded.module)
    length = capture_options.decoder_length(loaded.facts) if loaded.task == "causal-lm" and loaded.facts else None
    backends, skipped = backends_for(backends, loaded, quant, request.targets, length)
    warnings = tokenizer_warnings(loaded, strict=request.strict)
    planning = plans_precision(request, loaded, quant)
    if request.eval_text is not None and loaded.task != "causal-lm":
        raise InputError(f"--eval-text applies to decoder LMs; {loaded.source} is a {loaded.task}",
                         hint="encoders are judged by the cosine of their outputs on the golden sentences")
    if request.eval_text is not None and loaded.tokenizer is None:
        raise InputError("--eval-text needs the model's tokenizer to turn the text into tokens, and this export has none",
                         hint="drop --no-tokenizer, or add tokenizer.json to the model folder")
    if loaded.task == "causal-lm" and loaded.tokenizer is None:
        warnings.append("perplexity on text was not measured: the export has no tokenizer; quality rests on "
                        "the golden cases' cosine (see --min-cosine)")

    cache, model_key = StageCache(request.cache_dir), None
    with progress.stage("capture") as stage:
        captured = capture(loaded, capture_options)
        if cache.enabled:
            stage.step("cache key")
            try:
                model_key = digest(model_digest(captured), tool_digest())
            except TypeError as e:  # a model part the key cannot read: run every stage rather than guess
                cache = StageCache(None)
                warnings.append(f"the stage cache is off for this export: {e}")

    grids = {b.name: options[b.name].int4_grid for b in backends}
    calibration = calibration or read_calibration(None)
    plans = {}
    if planning == "decoder" and any(grids.values()):
        budget = request.bits_per_weight or quality.DEFAULT_BITS_PER_WEIGHT
        wanted = tuple(sorted({g for g in grids.values() if g}))
        with progress.stage("plan precision") as stage:
            plans = cached_plan(cache, ("decoder", model_key, quant.record(), calibration, budget, wanted), stage,
                                lambda: plan_decoder_precision(captured, quant, *calibration, budget, wanted, on_step=stage.step))
        warnings += over_budget(plans, grids, budget)
    if planning == "encoder":
        floor = DEFAULT_FLOOR if request.min_cosine is None else request.min_cosine
        with progress.stage("plan precision") as stage:
            quant = cached_plan(cache, ("encoder", model_key, quant.record(), calibration, floor), stage,
                                lambda: {"": plan_mixed_precision(captured, quant, *calibration, floor, on_step=stage.step)})[""]
        if not quant.plan["floor_met"]:
            warnings.append(f"even with every layer int8 the calibration outputs reach cosine "
                            f"{quant.plan['planned_min_cosine']} < {quant.plan['floor']} from fp32")

    # Each backend's QuantSpec: its int4 grid's own plan (decoder LMs), or one for all
    specs = {name: plans.get(grid, quant) for name, grid in grids.items()}
    # A decoder LM's offset-grid blocks are fitted to the calibration text, in place
    # (fit_offset_blocks), before the first offset-grid backend the cache does not hold. What needs
    # the float weights comes first: the backends on other grids, and fp32's perplexity.
    fitted = {name for name, grid in grids.items() if grid == "offset"} if calibrated(loaded, quant) == "decoder" else set()
    artifact_keys = {name: digest("artifact", model_key, name, options[name], specs[name].record(),
                                  calibration if name in fitted else None)
                     for name in specs} if cache.enabled else {}
    fit_due, fp32_text = bool(fitted), None
    artifacts, failures = [], []
    for backend in sorted(backends, key=lambda b: b.name in fitted):  # stable: --target's order otherwise
        key = artifact_keys.get(backend.name)
        kept = cache.get_artifact(key, f"lower {backend.name}") if key else None
        if fit_due and backend.name in fitted and kept is None:
            with progress.stage("quality fp32") as stage:
                fp32_text = fp32_eval_text(captured, eval_text, stage, cache, model_key)
            with progress.stage("fit offset grid") as stage:
                fit = fit_offset_blocks(captured, specs[backend.name], calibration[0], on_step=stage.step)
                stage.note(f"{fit['changed']} of {fit['weights']} weights moved, median weighted error "
                           f"{fit['median_weighted_error_vs_min_max']:g}× min..max's")
            fit_due = False
        try:
            with progress.stage(f"lower {backend.name}") as stage:
                artifacts.append(lowered(backend, captured, specs[backend.name], options[backend.name], cache, key,
                                         kept, stage))
            warnings += artifact_warnings(artifacts[-1], strict=request.strict)
        except EdgepackError as e:
            if request.strict or no_space(e) or isinstance(e, CaptureAltered):
                raise
            failures.append(_failure(e, backend.name))
            progress.console.print(f"[red]{backend.name} failed:[/] {e}")
    order = [b.name for b in backends]
    artifacts.sort(key=lambda a: order.index(a.backend))
    result = ExportResult(None, artifacts, failures, [], progress, warnings=warnings, skipped=skipped, cache=cache)
    if not artifacts:
        result.peak_rss_bytes = peak_rss_bytes()
        return result

    with StagedBundle(request.out_dir, loaded.name) as staging:
        for left in staging.removed:
            progress.console.print(f"[dim]removed {left.folder}, a bundle a killed export left half-written "
                                   f"({left.bytes / 1e9:.2f} GB)[/]", soft_wrap=True)
        with progress.stage("package"):
            manifest = stage_contents(staging, captured, quantization_record(quant, {a.backend: specs[a.backend] for a in artifacts}, grids, fitted), artifacts, failures)
            for artifact in artifacts:  # on disk now: a 1B float .onnx's 6 GB would sit beside the runtime the smoke loads
                artifact.files.clear()
        with progress.stage("smoke") as stage:
            result.smoke = smoke_bundle(staging.root, manifest)
            if not all(s.passed for s in result.smoke):
                stage.mark_failed()  # keeps the runtimes' output of a failed check
        manifest["comparisons"]["lowering_fidelity"] = {s.backend: s.as_dict() for s in result.smoke}
        gate_cosine(request, quant, manifest, result)
        if loaded.task == "causal-lm" and loaded.tokenizer is not None:
            with progress.stage("quality") as stage:
                text = fp32_text or fp32_eval_text(captured, eval_text, stage, cache, model_key)
                manifest["quality"] = measure_quality(request, text, staging, manifest, stage, result, artifact_keys)
        manifest["verdict"] = {"passed": result.passed, "failures": verdict_failures(result), "warnings": result.warnings,
                               "skipped": result.skipped}
        with progress.stage("archive"):  # deflating a 1B model's weights takes from half a minute to minutes
            result.bundle = commit(staging, manifest, passed=result.passed)
    result.peak_rss_bytes = peak_rss_bytes()
    if cache.stored:
        cache.prune()
    return result


def cached_plan(cache: StageCache, inputs: tuple, stage, plan) -> dict[str, "QuantSpec"]:
    """The precision plans ({grid: spec}) `plan()` makes from `inputs`, or the cache's."""
    key = digest("plan", *inputs) if cache.enabled else None
    kept = cache.get_json("plan", key, "plan precision") if key else None
    if kept is not None:
        stage.note("from the cache")
        return {grid: QuantSpec.from_record(r) for grid, r in kept.items()}
    plans = plan()
    if key:
        cache.put_json("plan", key, {grid: spec.record() for grid, spec in plans.items()})
    return plans


def lowered(backend, captured, spec: QuantSpec, options, cache: StageCache, key: str | None,
            kept: Artifact | None, stage) -> Artifact:
    """The backend's artifact: `kept`, the cache's, or lowered now (and kept there)."""
    if kept is not None:
        stage.note("from the cache")
        return kept
    artifact = lower(backend, captured, spec, options, on_step=stage.step)
    if key:
        cache.put_artifact(key, artifact)
    return artifact


def over_budget(plans: dict[str, QuantSpec], grids: dict[str, str], budget: float) -> list[str]:
    """A warning for each grid whose every layer at int4 already takes more than the budget."""
    return [f"{', '.join(n for n, g in grids.items() if g == grid)}: the {grid} grid stores int4 at "
            f"{spec.plan['bits_per_weight']:g} bits a weight, over --bits-per-weight {budget:g}, so every layer is int4 "
            f"(the symmetric grid, which a backend's grid option selects, stores 4.5)"
            for grid, spec in plans.items() if spec.plan["bits_per_weight"] > budget]


OWN_QUANTIZER = "none: the backend's quantizer chose"  # the plans' key for backends with no int4 grid


def quantization_record(request: QuantSpec, specs: dict[str, QuantSpec], grids: dict[str, str],
                        fitted: set[str]) -> dict:
    """The manifest's quantization: the one spec every backend followed or, when the backends'
    int4 grids got plans of their own (or a backend's own quantizer chose), the request's scheme
    and each grid's plan (its overrides and how they were chosen) with the backends that follow it;
    and which backends store blocks fitted to the calibration text, and how."""
    if len({id(s) for s in specs.values()}) <= 1 and all(grids[name] for name in specs):
        record = next(iter(specs.values()), request).describe()
    else:
        plans: dict[str, dict] = {}
        for name, spec in sorted(specs.items()):
            described = spec.describe()
            grid = grids[name] or OWN_QUANTIZER
            plans.setdefault(grid, {"backends": [], **{k: described[k] for k in ("overrides", "plan") if k in described}})
            plans[grid]["backends"].append(name)
        record = {**request.describe(), "plans": dict(sorted(plans.items()))}
    if fit := [name for name in specs if name in fitted]:
        record["block_fit"] = {"backends": fit, "method": BLOCK_FIT}
    return record


def gate_cosine(request: ExportRequest, quant: QuantSpec, manifest: dict, result: ExportResult) -> None:
    """--min-cosine on the quantized model against fp32 (the golden cases), and the precision
    plan's floor as a warning."""
    for backend, cases in manifest["comparisons"]["quantization_quality"].items():
        worst = min(m["min_cosine"] for m in cases.values())
        if request.min_cosine is not None and worst < request.min_cosine:
            result.quality_failures.append(f"{backend}: quantized vs fp32 cosine {worst} < --min-cosine {request.min_cosine}")
        elif quant.plan and "floor" in quant.plan and worst < quant.plan["floor"]:
            result.warnings.append(
                f"{backend}: the golden cases reach cosine {worst} from fp32, under the {quant.plan['floor']} the "
                f"precision plan held on its calibration texts; plan with texts like the app's (--calibration) "
                f"or gate the export with --min-cosine")


def fp32_eval_text(captured, eval_text: tuple[str, str], stage, cache: StageCache, model_key: str | None) -> quality.EvalText:
    """The evaluation text's windows and the float model's perplexity on them (from the cache when
    this model was measured on this text before)."""
    loaded = captured.loaded
    stage.step("fp32")
    text_key = digest("eval text", model_key, eval_text) if cache.enabled else None
    kept = cache.get_json("quality", text_key, "quality fp32") if text_key else None
    if kept is not None:
        return quality.EvalText.from_record(kept)
    text = quality.prepare_eval_text(loaded.module, lambda t: encode(loaded.tokenizer, t),
                                     *eval_text, captured.llm_metadata["get_max_seq_len"])
    if text_key:
        cache.put_json("quality", text_key, text.record())
    return text


def measure_quality(request: ExportRequest, text: quality.EvalText, staging: StagedBundle, manifest: dict,
                    stage, result: ExportResult, artifact_keys: dict[str, str]) -> dict:
    """Perplexity of every artifact on the evaluation text against fp32's (each artifact's from the
    cache when it was measured on this text before), and the gates on it."""
    cache = result.cache
    bound = quality.DEFAULT_MAX_INCREASE_PCT if request.max_ppl_increase is None else request.max_ppl_increase
    keys = {backend: digest("quality", key, text.sha256) for backend, key in artifact_keys.items()}
    measured = {a["backend"]: kept for a in manifest["artifacts"] if a["backend"] in keys
                and (kept := cache.get_json("quality", keys[a["backend"]], f"quality {a['backend']}")) is not None}
    if measured:
        stage.note(f"{', '.join(measured)} from the cache")
    fresh = quality.measure_bundle(staging.root, manifest, text, on_step=stage.step,
                                   backends=[a["backend"] for a in manifest["artifacts"] if a["backend"] not in measured])
    for backend, metrics in fresh.items():
        if backend in keys and "error" not in metrics:
            cache.put_json("quality", keys[backend], metrics)
    measured = {a["backend"]: {**measured, **fresh}[a["backend"]] for a in manifest["artifacts"]}
    for backend, metrics in measured.items():
        failed, warned = quality.judge(metrics, bound)
        result.quality_failures += [f"{backend}: {m}" for m in failed]
        result.warnings += [f"{backend}: {m}" for m in warned]
        metrics["passed"] = not failed
    if any(not m["passed"] for m in measured.values()):
        stage.mark_failed()
    return {"text": {"source": text.source, "sha256": text.sha256, "windows": len(text.windows),
                     "prefill": text.prefill, "scored_tokens": text.scored_tokens},
            "max_increase_pct": bound, "warn_increase_pct": quality.WARN_INCREASE_PCT, "artifacts": measured}


def verdict_failures(result: ExportResult) -> list[str]:
    return ([f"{f['backend']}: {f['message']}" for f in result.failures]
            + [f"{s.backend}: smoke failed" + (f": {s.error}" if s.error else "") for s in result.smoke if not s.passed]
            + result.quality_failures)
