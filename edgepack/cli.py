"""The edgepack command line: export, export-many, plan, smoke, inspect, diff, cache, doctor.

Human text goes to stderr; with --json, one machine-readable object goes to stdout.
Exit codes: 0 all produced and smoke-tested, 1 a backend or a check failed, 2 bad usage or input,
3 the environment a smoke run needs is missing (arm64 set-up, adb, Xcode)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import traceback
import typing
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from edgepack import __version__
from edgepack.errors import EXIT_BAD_INPUT, EXIT_FAILED, EdgepackError, InputError
from edgepack.exporters.registry import BACKENDS, DEFAULT_TARGET
from edgepack.packaging.quality import DEFAULT_BITS_PER_WEIGHT, DEFAULT_MAX_INCREASE_PCT, WARN_INCREASE_PCT
from edgepack.scratch import run_folder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Turn a PyTorch model into Android and iOS artifacts with 4-bit weights, bundled with its "
         "tokenizer, a manifest and a smoke test.\n\n"
         f"Example:  [bold]edgepack export ./my-model --target {DEFAULT_TARGET} --out dist/[/]",
)
err = Console(stderr=True)


def _emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _fail(error: BaseException, as_json: bool, verbose: bool) -> None:
    if isinstance(error, EdgepackError):
        code, kind = error.exit_code, type(error).__name__
        # escaped: a message quotes paths and files, whose brackets are not markup
        err.print(f"[bold red]error:[/] {escape(error.message)}", highlight=False, soft_wrap=True)
        if error.hint:
            err.print(f"  [dim]hint:[/] {escape(error.hint)}", highlight=False, soft_wrap=True)
    else:
        code, kind = EXIT_FAILED, "InternalError"
        err.print(f"[bold red]internal error (a bug in edgepack):[/] {type(error).__name__}: {escape(str(error))}",
                  highlight=False, soft_wrap=True)
    if verbose:
        err.print("".join(traceback.format_exception(error)), highlight=False, markup=False)
    if as_json:
        _emit_json({"ok": False, "exit_code": code, "error": {"type": kind, "message": str(error)}})
    raise typer.Exit(code)


def _source_label(source: str) -> str:
    """Names an export's output logs before the model is loaded: the source's file or folder name."""
    return Path(source.split(":")[0]).stem or "export"


def with_backend_flags(command):
    """`command` plus one option per field of each backend's Options that declares a flag
    (exporters/backend.py `flag`), in the backend's own help panel. The command receives the
    values given as backend_options={backend: {field: value}}; a flag left out keeps the field's
    default."""
    hints = typing.get_type_hints(command)
    params = [p for p in signature(command).parameters.values() if p.name != "backend_options"]
    fields = {}  # parameter name -> (backend, Options field)
    for backend in BACKENDS.values():
        for field, meta in backend.flags():
            name = meta["flag"].lstrip("-").replace("-", "_")
            kind = list[meta["type"]] if meta["multiple"] else meta["type"]
            hints[name] = Optional[kind]
            option = typer.Option(None, meta["flag"], help=meta["help"], rich_help_panel=backend.title,
                                  metavar="N" if meta["type"] is int else None)
            params.append(Parameter(name, Parameter.KEYWORD_ONLY, default=option, annotation=hints[name]))
            fields[name] = (backend.name, field.name)

    @functools.wraps(command)
    def run(**values):
        given = {}
        for name, (backend, field) in fields.items():
            value = values.pop(name)
            if value:  # None, or an empty list for a repeatable flag never given
                given.setdefault(backend, {})[field] = tuple(value) if isinstance(value, list) else value
        return command(**values, backend_options=given)

    hints.pop("backend_options")
    run.__signature__ = Signature([p.replace(kind=Parameter.KEYWORD_ONLY) for p in params])
    run.__annotations__ = hints
    return run


@app.command()
@with_backend_flags
def export(
    source: str = typer.Argument(..., help="A local Hugging Face model directory, a hub id in the local Hugging Face cache (ORG/NAME[@REVISION]; never downloaded), a GGUF file, a .pt2 file, or file.py:factory / module:factory."),
    target: str = typer.Option(DEFAULT_TARGET, "--target", "-t", help=f"Comma-separated backends ({', '.join(BACKENDS)}), or 'all'."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="The bundle is written to OUT/NAME/."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: the source's directory or file name)."),
    quant: str = typer.Option("int4", help="int4 (4-bit group-wise weights, int8 dynamic activations), int8, or none."),
    group_size: int = typer.Option(32, help="Weights per quantization group for int4."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache length for decoder LMs (default: min(config max positions, 2048)). Give the context your app needs: TFLite reads its whole static cache at every decode step (SmolLM2-135M on the LiteRT-LM engine decoded 0.82x as fast at 512 as at 128, and 0.52x at 2048; docs/bench.md)."),
    min_cosine: Optional[float] = typer.Option(None, help="Fail (exit 1) if quantized vs fp32 cosine (logits, or an encoder's outputs) falls below this, in (0, 1]; for encoders also the floor mixed precision plans for (default 0.99)."),
    max_ppl_increase: Optional[float] = typer.Option(None, metavar="PCT", rich_help_panel="Decoder LMs", help=f"Fail (exit 1) if an artifact's perplexity on the evaluation text rises more than PCT % over fp32 (default {DEFAULT_MAX_INCREASE_PCT:g}; a rise over {WARN_INCREASE_PCT:g} % is a warning). Measured on the real SmolLM2-135M with the default precision plan: every backend's int4 artifact +3.6..7.1 %, the symmetric grids (--*-grid symmetric) +23..62 % (docs/quantization.md); broken artifacts several times fp32. Non-finite logits always fail."),
    eval_text: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel="Decoder LMs", help="Decoder LMs: the text perplexity is measured on, UTF-8, documents separated by a line '---' (default: a built-in text of ~3,000 tokens mixing prose in six languages, code and dialogue, apart from any calibration text). Each artifact runs it on its own runtime through the KV cache, as an app decodes."),
    mixed_precision: Optional[str] = typer.Option(None, help="At --quant int4: auto (default) keeps the layers whose int4 weights cost most per stored bit at int8 (per channel). Encoders: fewest first, until every calibration text's output is within cosine halfway between the floor (--min-cosine, default 0.99) and 1 of fp32. Decoder LMs: costliest first by their estimated cost to the calibration text's loss, within --bits-per-weight. off stores every layer int4. Either way, a decoder LM's 4-bit blocks on the offset grid are fitted to the calibration text (each block's scale and minimum, weighted by the layer's inputs)."),
    bits_per_weight: Optional[float] = typer.Option(None, metavar="BITS", rich_help_panel="Decoder LMs", help=f"Decoder LMs at --quant int4: the average bits a quantized weight may take, scales included, when mixed precision keeps layers int8 (default {DEFAULT_BITS_PER_WEIGHT:g}; int8 is about 8). Each int4 grid the targets store gets its own plan: int4 g32 alone is 5.0 bits on the offset grid (a scale and an offset per block), 4.5 on the symmetric grid; each backend's options say which it stores."),
    calibration: Optional[Path] = typer.Option(None, metavar="FILE", help="Texts to plan mixed precision with and, for decoder LMs on the offset grid, to fit the 4-bit blocks to (also with --mixed-precision off), one per line, apart from the evaluation text (default: 40 built-in sentences in several languages)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first backend failure."),
    no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Export a model directory without tokenizer files (non-text models)."),
    pooling: str = typer.Option("none", rich_help_panel="Encoders", help="Encoders: none (last_hidden_state per token), mean (sentence_embedding: masked mean, as sentence-transformers) or cls (first token)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="EDGEPACK_CACHE_DIR", metavar="DIR", show_default=False, rich_help_panel="Stage cache", help="Where the precision plan, each backend's artifact and each perplexity are kept, keyed by the captured model's content, the options and the tool versions, so a re-export (one more target, a rerun after a kill) takes them from there; the output is the same bytes. Default: edgepack/ in the user's cache directory (~/.cache), bounded to 10 GB. See `edgepack cache`."),
    no_cache: bool = typer.Option(False, "--no-cache", envvar="EDGEPACK_NO_CACHE", metavar="", rich_help_panel="Stage cache", help="Run every stage; keep nothing in the cache."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the converters' own output as they run, and full tracebacks."),
    backend_options: dict = None,  # filled from the backends' own flags (with_backend_flags)
) -> None:
    """Export a model to mobile artifacts, package the bundle, and smoke-test it on the host.

    [bold]Examples[/]

      edgepack export ./SmolLM2-135M --target executorch --out dist/
      edgepack export ./tiny-llama --quant int8 --max-seq-len 512 --json > summary.json
      edgepack export my_model.py:build --name mymodel
      edgepack export ./all-MiniLM-L6-v2 --pooling mean --target tflite,coreml

    [bold]Large models[/]

      Memory and disk are checked before the first slow step: an export that would not fit is
      refused, saying how much it needs. A Llama-3.2-1B-shaped model (4.9 GB of fp32 weights)
      peaks at 2.1-2.3x its fp32 weights in memory (ExecuTorch, ONNX, MNN, TFLite), and ONNX, MNN and
      TFLite keep the float weights in TMPDIR while they work (up to 2x, 1.5x and 1.1x them on
      disk): set TMPDIR to a roomy disk (bench/results/scale.json, docs/limits.md).
    """
    from edgepack.cache import default_cache_dir
    from edgepack.pipeline import ExportRequest
    from edgepack.pipeline import export as run_export
    from edgepack.progress import Progress
    from edgepack.report import export_summary, print_export_summary

    request = ExportRequest(source=source, targets=target, out_dir=out, name=name, quant=quant, group_size=group_size,
                            max_seq_len=max_seq_len, min_cosine=min_cosine, strict=strict, no_tokenizer=no_tokenizer,
                            pooling=pooling, mixed_precision=mixed_precision, calibration=calibration, bits_per_weight=bits_per_weight,
                            max_ppl_increase=max_ppl_increase, eval_text=eval_text, backend_options=backend_options,
                            cache_dir=None if no_cache else cache_dir or default_cache_dir())
    try:
        result = run_export(request, Progress(err, verbose=verbose, log_label=name or _source_label(source)))
    except BaseException as e:  # noqa: BLE001 - every failure becomes an exit code
        if isinstance(e, (KeyboardInterrupt, typer.Exit)):
            raise
        _fail(e, as_json, verbose)
    summary = export_summary(result)
    print_export_summary(err, summary)
    if as_json:
        _emit_json(summary)
    raise typer.Exit(result.exit_code)


@app.command()
def smoke(
    bundle: Path = typer.Argument(..., help="A bundle directory written by `edgepack export`."),
    on: str = typer.Option("host", help="Where to run: host, arm64-emulated (arm64 runtimes under qemu: `make arm64-env`), "
                                        "android-emulator (adb, the sample app's instrumented test) or ios-simulator "
                                        "(xcodebuild, the sample app's XCTest)."),
    backend: Optional[str] = typer.Option(None, help="Only this backend (default: every artifact)."),
    report_dir: Optional[Path] = typer.Option(None, help="android-emulator / ios-simulator: keep the JUnit XML and logs here."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the runtimes' own output as they run, and full tracebacks."),
) -> None:
    """Replay the bundle's golden cases through its artifacts and compare with the expected outputs.

    [bold]Example[/]

      edgepack smoke dist/my-model
      edgepack smoke dist/my-model --on android-emulator --report-dir reports/
    """
    from edgepack.packaging.bundle import read_bundle
    from edgepack.packaging.device_smoke import TARGETS
    from edgepack.packaging.smoke import smoke_bundle
    from edgepack.progress import Progress
    from edgepack.report import print_smoke

    arm64 = device = None
    try:
        if on not in ("host", "arm64-emulated", *TARGETS):
            raise InputError(f"--on {on!r}: choose one of host, arm64-emulated, {', '.join(TARGETS)}")
        manifest = read_bundle(bundle)
        with Progress(err, verbose=verbose, log_label=bundle.name).stage(f"smoke {on}") as stage:
            if on == "host":
                results = smoke_bundle(bundle, manifest, [backend] if backend else None)
            elif on in TARGETS:
                from edgepack.packaging.device_smoke import smoke_device

                device = smoke_device(bundle, manifest, on, [backend] if backend else None, report_dir)
                results = device.results
            else:
                from edgepack.packaging.arm64_smoke import smoke_arm64

                arm64 = smoke_arm64(bundle, manifest, [backend] if backend else None)
                results = arm64.results
            if not all(r.passed for r in results):
                stage.mark_failed()  # keeps the runtimes' output of a failed check
        if backend and not results:
            raise InputError(f"{bundle}: has no {backend!r} artifact")
    except typer.Exit:
        raise
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        _fail(e, as_json, verbose)
    print_smoke(err, results)
    if arm64:
        from edgepack.packaging.arm64_smoke import print_arm64

        print_arm64(err, arm64)
    if device:
        for name, why in device.not_run.items():
            err.print(f"[yellow]not run[/] on {on}: {name}: {why}", highlight=False, soft_wrap=True)
        if on == "ios-simulator":
            err.print("note: the iOS Simulator runs on the Mac's CPU; its numerics can differ from a device's",
                      highlight=False, soft_wrap=True)
    passed = all(r.passed for r in results)
    extra = ({"not_run": arm64.not_run, "notes": arm64.notes} if arm64 else
             {"not_run": device.not_run, "report": str(device.report) if device.report else None} if device else {})
    if as_json:
        results_json = {r.backend: {**r.as_dict(), "memory": r.memory} for r in results}  # memory: measured now
        _emit_json({"ok": passed, "bundle": str(bundle), "on": on, "results": results_json, **extra})
    raise typer.Exit(0 if passed else EXIT_FAILED)


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="A bundle directory written by `edgepack export`."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Show a bundle's manifest (validated against the schema) as readable tables.

    [bold]Example[/]

      edgepack inspect dist/my-model
    """
    from edgepack.packaging.bundle import read_bundle
    from edgepack.report import print_manifest

    try:
        manifest = read_bundle(bundle)
    except EdgepackError as e:
        _fail(e, as_json, False)
    if as_json:
        _emit_json(manifest)
    else:
        print_manifest(Console(), manifest, bundle)


@app.command()
def diff(
    old: Path = typer.Argument(..., help="The earlier bundle (a directory written by `edgepack export`)."),
    new: Path = typer.Argument(..., help="The bundle to compare with it."),
    max_size_increase: Optional[float] = typer.Option(
        None, "--max-size-increase", metavar="PCT",
        help="Exit 1 if an artifact of NEW is more than PCT % larger than OLD's (or OLD's artifact is missing from NEW)."),
    max_ppl_increase: Optional[float] = typer.Option(
        None, "--max-ppl-increase", metavar="PCT",
        help="Exit 1 if an artifact's perplexity in NEW is more than PCT % above OLD's, or cannot be compared "
             "(measured on different texts or in one bundle only)."),
    as_json: bool = typer.Option(False, "--json", help="Print every compared quantity as JSON on stdout."),
) -> None:
    """Compare two bundles: each artifact's size, perplexity, cosines and golden tokens, the source
    weights, the settings and the toolchain. Both bundles are checked against their file index first.

    [bold]Example[/] (release CI, against the last release's bundle)

      edgepack diff last-release/my-model dist/my-model --max-size-increase 2 --max-ppl-increase 1
    """
    from edgepack.packaging.diff import Bounds, diff_bundles
    from edgepack.report import print_diff

    try:
        result = diff_bundles(old, new, Bounds(max_size_increase, max_ppl_increase))
    except EdgepackError as e:
        _fail(e, as_json, False)
    if as_json:
        _emit_json(result)
    else:
        print_diff(err, result)
    raise typer.Exit(0 if result["passed"] else EXIT_FAILED)


def _export_options() -> dict[str, dict]:
    """`edgepack export`'s long flags (without dashes): whether each is a switch, and repeatable."""
    command = typer.main.get_command(app).commands["export"]
    return {opt[2:]: {"flag": p.is_flag, "multiple": p.multiple}
            for p in command.params for opt in p.opts if opt.startswith("--")}


RELEASE_FILE = typer.Argument(..., metavar="RELEASE.toml", help="The release file: [defaults] and [[model]] entries whose keys are export's long flags (see `edgepack export-many --help`).")


@app.command("export-many")
def export_many(
    release: Path = RELEASE_FILE,
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="NAME", help="Only this model (its name in the release file); repeatable."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only these of each model's targets (a CI matrix job: one)."),
    as_json: bool = typer.Option(False, "--json", help="Print every export's record, with its own --json summary, on stdout."),
) -> None:
    """Export every model of a release file in sequence, each as its own `edgepack export`, going on
    past a failure; then one table of what passed. Exits with the worst exit code of the exports.

    [bold]Release file[/]

      [defaults]                 # every model's export flags, unless it sets its own
      target = "executorch,onnx"
      out = "dist"
      [[model]]
      source = "build/smollm2-135m-instruct"
      name = "smollm2"           # the bundle's name (default: the source's)
      target = "all"
      max-ppl-increase = 12      # any export flag, without its dashes; true for a switch

    [bold]Examples[/]

      edgepack export-many release.toml
      edgepack export-many release.toml --only smollm2 --target onnx   # one job of `plan --github-matrix`
    """
    from edgepack.release import read_release, run_jobs, select
    from edgepack.report import print_release

    try:
        chosen = select(read_release(release, _export_options()), only or [], target)
    except EdgepackError as e:
        _fail(e, as_json, False)

    def announce(i: int, job, argv: list[str]) -> None:
        err.rule(f"[{i + 1}/{len(chosen)}] {job.name}")
        err.print("edgepack export " + " ".join(argv), highlight=False, soft_wrap=True)

    records = run_jobs(chosen, announce)
    print_release(err, records)
    code = max((r["exit_code"] for r in records), default=0)
    if as_json:
        _emit_json({"ok": code == 0, "exit_code": code, "exports": records})
    raise typer.Exit(code)


@app.command()
def plan(
    release: Path = RELEASE_FILE,
    github_matrix: bool = typer.Option(False, "--github-matrix", help="Print the GitHub Actions matrix, one job per model × target, as one line of JSON (for $GITHUB_OUTPUT)."),
) -> None:
    """Show what `edgepack export-many` would run for a release file, or (--github-matrix) the CI
    matrix that fans it out; nothing is exported. The release file is checked as export-many checks it.

    [bold]Example[/] (.github/workflows/release.yml)

      echo "matrix=$(edgepack plan release.toml --github-matrix)" >> "$GITHUB_OUTPUT"
    """
    from edgepack.release import github_matrix as matrix_of
    from edgepack.release import read_release

    try:
        jobs = read_release(release, _export_options())
    except EdgepackError as e:
        _fail(e, False, False)
    if github_matrix:
        sys.stdout.write(json.dumps(matrix_of(jobs), separators=(",", ":")) + "\n")
        return
    for job in jobs:
        typer.echo(f"{job.name}: edgepack export {' '.join(job.argv())}")


cache_app = typer.Typer(no_args_is_help=True, help="Show or prune the stage cache that `edgepack export` reuses (see export --cache-dir).")
app.add_typer(cache_app, name="cache")
CACHE_DIR_OPTION = typer.Option(None, "--cache-dir", envvar="EDGEPACK_CACHE_DIR", metavar="DIR", show_default=False,
                                help="The cache (default: edgepack/ in the user's cache directory, ~/.cache).")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = CACHE_DIR_OPTION,
               as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout.")) -> None:
    """Where the stage cache is, and what it holds: entries and bytes per kind.

    [bold]Example[/]

      edgepack cache info
    """
    from edgepack.cache import StageCache, default_cache_dir
    from edgepack.report import print_cache_info

    info = StageCache(cache_dir or default_cache_dir()).info()
    if as_json:
        _emit_json(info)
    else:
        print_cache_info(Console(), info)


@cache_app.command("prune")
def cache_prune(max_size: str = typer.Option("0", "--max-size", metavar="SIZE", help="Keep at most this much, the most recently used first (e.g. 5GB, 500MB; 0, the default, empties the cache)."),
                cache_dir: Optional[Path] = CACHE_DIR_OPTION,
                as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON on stdout.")) -> None:
    """Remove the least recently used entries of the stage cache until it holds at most --max-size.

    [bold]Examples[/]

      edgepack cache prune                  # empty it
      edgepack cache prune --max-size 5GB   # release CI, before the cache action saves it
    """
    from edgepack.cache import StageCache, default_cache_dir, parse_size

    try:
        pruned = StageCache(cache_dir or default_cache_dir()).prune(parse_size(max_size))
    except EdgepackError as e:
        _fail(e, as_json, False)
    if as_json:
        _emit_json(pruned)
    else:
        err.print(f"removed {pruned['removed']} entries ({pruned['freed_bytes'] / 1e6:.2f} MB); "
                  f"{pruned['bytes'] / 1e6:.2f} MB kept", highlight=False)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON on stdout.")) -> None:
    """List the backends, converters and runtimes installed here, with their versions.

    [bold]Example[/]

      edgepack doctor
    """
    from edgepack.report import doctor_report, print_doctor

    report = doctor_report()
    if as_json:
        _emit_json(report)
    else:
        print_doctor(Console(), report)


@app.callback(invoke_without_command=True)
def _version(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit(0)


def main() -> None:
    # A terminated export (a CI job's timeout sends SIGTERM) unwinds as Ctrl-C does, so its
    # temporary folders (a 1B model's weights are gigabytes) and half-written bundle are removed;
    # then the process ends by the same signal, as it would have without this handler.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _run_folder():
            app()
    finally:
        if _TERMINATED:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


_TERMINATED: list[int] = []


@contextlib.contextmanager
def _run_folder():
    """Every temporary file of the run in one folder under TMPDIR (edgepack/scratch.py), after
    removing those that killed runs left there."""
    stack = contextlib.ExitStack()
    try:
        removed = stack.enter_context(run_folder())
    except OSError as e:
        err.print(f"[bold red]error:[/] cannot make a temporary folder in {escape(tempfile.gettempdir())}: "
                  f"{escape(e.strerror or str(e))}", highlight=False, soft_wrap=True)
        err.print("  [dim]hint:[/] set TMPDIR to a writable folder with free space", highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    with stack:
        if removed:
            err.print(f"[dim]removed {len(removed)} temporary folder(s) that killed edgepack runs left in "
                      f"{escape(str(removed[0].folder.parent))} ({sum(r.bytes for r in removed) / 1e9:.2f} GB)[/]",
                      highlight=False, soft_wrap=True)
        yield


def _interrupt(signum: int, frame) -> None:
    _TERMINATED.append(signum)
    raise KeyboardInterrupt
