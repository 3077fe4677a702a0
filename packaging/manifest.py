"""manifest.json: what is in a bundle, how it was made, how to call it, and how it was checked.
Validated against manifest.schema.json (published beside this file) on write and on read."""

from __future__ import annotations

import json
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jsonschema

from edgepack import __version__
from edgepack.errors import InputError
from edgepack.exporters.registry import BACKENDS

SCHEMA_VERSION = "1.1"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
# The front end's libraries; each backend adds its own (Backend.distributions and optional_distributions).
FRONT_END = ("torch", "transformers", "tokenizers", "numpy")


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def toolchain_versions() -> dict[str, str]:
    versions = {"edgepack": __version__, "python": platform.python_version()}
    backends = [d for b in BACKENDS.values() for d in (*b.distributions, *b.optional_distributions)]
    for dist in (*FRONT_END, *backends):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return versions


def validate(manifest: dict, where: str) -> None:
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        at = "/".join(map(str, first.path)) or "(top level)"
        raise InputError(f"{where}: manifest does not match schema {SCHEMA_VERSION} at {at}: {first.message}"
                         + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


def dumps(manifest: dict) -> bytes:
    """Canonical bytes: sorted keys, fixed indentation, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(manifest: dict, path: Path) -> None:
    validate(manifest, str(path))
    path.write_bytes(dumps(manifest))


def read_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise InputError(f"{bundle}: not an edgepack bundle (no manifest.json)",
                         hint="pass the directory `edgepack export` wrote, e.g. dist/<name>")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not an edgepack manifest (a JSON {type(manifest).__name__})")
    found = manifest.get("schema_version")
    if found != SCHEMA_VERSION:
        raise InputError(f"{path}: written with manifest schema {found!r}; this edgepack reads {SCHEMA_VERSION}",
                         hint=f"re-export the model with edgepack {__version__}")
    validate(manifest, str(path))
    return manifest


def _array_ref(path: str, array) -> dict:
    return {"path": path, "dtype": str(array.dtype), "shape": list(array.shape)}


def smoke_section(captured, artifacts, case_files: dict) -> dict:
    """Golden cases: inputs, each backend's expected outputs, and the fp32 eager outputs."""
    cases = []
    for case in captured.cases:
        expected = {"fp32-eager": {n: _array_ref(case_files[(case.name, "fp32-eager", n)], a)
                                   for n, a in zip(captured.fp32_outputs[case.name].names, captured.fp32_outputs[case.name].arrays)}}
        for art in artifacts:
            out = art.reference_outputs[case.name]
            expected[art.backend] = {n: _array_ref(case_files[(case.name, art.backend, n)], a) for n, a in zip(out.names, out.arrays)}
        cases.append({
            "name": case.name, "kind": case.kind, "method": case.method, "steps": case.steps, "note": case.note,
            "inputs": [{"name": n, **_array_ref(case_files[(case.name, "input", n)], a)} for n, a in zip(case.input_names, case.inputs)],
            "expected": expected,
        })
    return {"tolerance": captured.tolerance.as_dict(), "cases": cases}


KV_ITEM_BYTES = {"float32": 4, "float16": 2}


def memory_record(artifact, captured) -> dict:
    """What the artifact takes in an app's memory, computed (nothing here is measured): its weights
    as its files hold them (the main file, or the directory, and any data file beside it named after
    it; each runtime maps or loads them whole), and a decoder's KV cache, keys and values for every
    layer and KV head, in the dtype the artifact keeps them in."""
    facts, kv = captured.loaded.facts, artifact.kv_cache
    weights = sum(len(data) for name, data in artifact.files.items() if name.startswith(artifact.main_file))
    record = {"weights_bytes": weights, "kv_cache": None}
    if kv is not None and facts is not None:
        per_token = 2 * facts.n_layers * facts.n_kv_heads * facts.head_dim * KV_ITEM_BYTES[kv.dtype]
        max_context = captured.llm_metadata["get_max_context_len"]
        record["kv_cache"] = {"dtype": kv.dtype, "allocation": kv.allocation, "bytes_per_token": per_token,
                              "bytes_per_1000_tokens": 1000 * per_token, "max_context": max_context,
                              "bytes_at_max_context": max_context * per_token}
    return record


def build_manifest(captured, quantization: dict, artifacts, artifact_files: dict, tokenizer_files: list, case_files: dict,
                   failures: list[dict]) -> dict:
    loaded = captured.loaded
    facts, tok = loaded.facts, loaded.tokenizer
    meta = captured.llm_metadata
    return {
        "schema_version": SCHEMA_VERSION,
        "name": loaded.name,
        "model": {
            "source": loaded.source,
            "source_kind": loaded.source_kind,
            "task": loaded.task,
            "architecture": None if facts is None else {
                "family": facts.family, "model_type": facts.model_type, "n_layers": facts.n_layers,
                "hidden_size": facts.hidden_size, "n_heads": facts.n_heads, "n_kv_heads": facts.n_kv_heads,
                "head_dim": facts.head_dim, "vocab_size": facts.vocab_size, "max_positions": facts.max_positions,
                "rope_theta": facts.rope_theta, "tied_embeddings": facts.tied_embeddings,
                "rope": facts.rope, "sliding_window": facts.sliding_window,
                "layer_types": list(facts.layer_types) if facts.layer_types else None,
            },
            "parameter_count": loaded.parameter_count,
            "weight_files": [{"name": n, "sha256": h} for n, h in loaded.weight_files],
            "source_quantization": loaded.source_quantization,
            "hub": loaded.hub,
        },
        "tokenizer": None if tok is None else {
            "files": tokenizer_files,
            "bos_id": tok.bos_id,
            "eos_ids": list(tok.eos_ids),
            "pad_id": tok.pad_id,
            "add_bos": tok.add_bos,
            "chat_template": tok.chat_template,
            "chat_example": tok.chat_example,
            "runner_check": tok.runner_check,
        },
        "generation": None if not meta else {
            "max_seq_len": meta["get_max_seq_len"],
            "max_context_len": meta["get_max_context_len"],
            "prefill_len": {"min": 1, "max": meta["get_max_seq_len"] - 1},
            # The runners' tokenizers (ExecuTorch's pytorch_tokenizers) do not apply tokenizer.json's
            # post-processor, so the app prepends BOS itself: GenerationConfig.num_bos on ExecuTorch.
            "num_bos": 1 if tok and tok.add_bos else 0,
            "calling_convention": "forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, vocab]; "
                                  "KV cache held inside the program",
        },
        "quantization": quantization,
        "artifacts": [
            {
                "backend": a.backend,
                "platforms": list(a.platforms),
                "path": a.main_file,
                **artifact_files[a.backend],
                "ideal_bytes": a.ideal_bytes,
                "quantization": a.quantization.as_dict(),
                "methods": [m.as_dict() for m in a.methods],
                "runtime": a.runtime.as_dict(),
                "smoke_tolerance": (a.tolerance or captured.tolerance).as_dict(),
                "memory": memory_record(a, captured),
            }
            for a in artifacts
        ],
        "failures": failures,
        "toolchain": toolchain_versions(),
        "smoke": smoke_section(captured, artifacts, case_files),
        "comparisons": {"lowering_fidelity": {}, "quantization_quality": {
            a.backend: a.quality for a in artifacts}},
    }
