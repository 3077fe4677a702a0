"""The stage cache: what a slow stage produced, kept under a key of everything it read, so an export
that repeats the stage (one more target, a rerun after a kill) takes it from here instead.

Stages kept: the precision plan, each backend's artifact (its files, record and quantized eager
answers), fp32's answers on the evaluation text and each artifact's perplexity there. Load and capture always run: their
result, the captured model, is what the keys are computed from. The smoke always runs: it is the
proof that the artifact in the bundle answers right.

A key is the sha256 of: the captured model's content (weights and buffers, golden inputs and fp32
answers, facts, tokenizer files, bundle name and source), the options the stage reads, and the tool
(edgepack's own source files and the toolchain's versions). So an entry is only found by an export
that would make the same bytes.

Safety: an entry is written in a temporary folder and renamed into place, so a killed export leaves
no half entry and concurrent exports never read one (the first rename wins, the other is dropped);
every file's sha256 is checked on read, and an entry that fails the check is removed and remade.
The least recently used entries go when the cache passes its size bound."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from edgepack.cases import CaseOutput, Tolerance
from edgepack.errors import InputError
from edgepack.stages import Artifact, CapturedModel, KvCache, MethodSpec, QuantRecord, RuntimeRecord

# The bound an export prunes the cache to after storing in it; `edgepack cache prune --max-size`
# sets any other.
DEFAULT_MAX_BYTES = 10 * 1024**3
KINDS = ("plan", "artifact", "quality")
_ENTRY = "entry.json"


def default_cache_dir() -> Path:
    """$EDGEPACK_CACHE_DIR, else edgepack/ in the user's cache directory ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("EDGEPACK_CACHE_DIR"):
        return Path(os.environ["EDGEPACK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepack"


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """`value` into the hash, unambiguously: JSON-like values by their canonical text, arrays and
    tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"array {value.dtype} {value.shape}\n".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}\n".encode())
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"list {len(value)}\n".encode())
        for v in value:
            _feed(h, v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(h, {"__type__": type(value).__name__, **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)}})
    elif value is None or isinstance(value, (bool, int, float, str, Path)):
        h.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"the stage cache cannot key a {type(value).__name__}")


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


@lru_cache(maxsize=1)
def tool_digest() -> str:
    """edgepack's own files (every file of its packages, so a change of code is a new key even at
    the same version) and every library version the manifest's toolchain records."""
    from edgepack import exporters, packaging
    from edgepack.packaging.manifest import toolchain_versions

    h = hashlib.sha256()
    roots = [Path(__file__).parent, *map(Path, exporters.__path__), *map(Path, packaging.__path__)]
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            _feed(h, [path.relative_to(root).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest()])
    _feed(h, toolchain_versions())
    return h.hexdigest()


def model_digest(captured: CapturedModel) -> str:
    """Everything of the captured model a later stage can read: the module's weights and buffers,
    the golden cases with their fp32 answers, its facts and calling convention, and the source's
    description (tokenizer files by content, not by where they lie)."""
    loaded = captured.loaded
    tokenizer = loaded.tokenizer
    tokenizer_part = None if tokenizer is None else {
        **{f.name: getattr(tokenizer, f.name) for f in dataclasses.fields(tokenizer) if f.name != "directory"},
        "file_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in tokenizer.file_bytes().items()}}
    described = {name: getattr(loaded, name) for name in (
        "name", "source", "source_kind", "task", "parameter_count", "weight_files", "source_quantization", "hub", "facts")}
    return digest(described, tokenizer_part, captured.module.state_dict(), captured.methods, captured.cases,
                  captured.fp32_outputs, captured.tolerance, captured.llm_metadata)


class StageCache:
    """Entries under root/<kind>/<key>/. root None: a cache that keeps nothing (--no-cache)."""

    def __init__(self, root: Path | None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root, self.max_bytes = root, max_bytes
        self.hits: list[str] = []  # the stages this export took from the cache, in order
        self.stored = False

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    # -- JSON values (plans, perplexities) -------------------------------------------------------

    def get_json(self, kind: str, key: str, stage: str) -> Any | None:
        found = self._read(kind, key)
        if found is None:
            return None
        self.hits.append(stage)
        return found[0]["value"]

    def put_json(self, kind: str, key: str, value: Any) -> None:
        self._write(kind, key, {"value": value}, {})

    # -- artifacts ---------------------------------------------------------------------------------

    def get_artifact(self, key: str, stage: str) -> Artifact | None:
        found = self._read("artifact", key)
        if found is None:
            return None
        entry, data = found
        self.hits.append(stage)
        return _artifact_from(entry["value"], data)

    def put_artifact(self, key: str, artifact: Artifact) -> None:
        # the arrays in the record's order of cases and names ("reference"), numbered
        arrays = {f"a{i}": array for i, array in enumerate(
            a for output in artifact.reference_outputs.values() for a in output.arrays)}
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        files = {**{f"files/{name}": data for name, data in artifact.files.items()}, "reference.npz": npz.getvalue()}
        self._write("artifact", key, {"value": _artifact_record(artifact)}, files)

    # -- the store ---------------------------------------------------------------------------------

    def _read(self, kind: str, key: str) -> tuple[dict, dict[str, bytes]] | None:
        """The entry's record and its files' bytes, each file read once and checked against its
        sha256 (what is used is what was checked); a damaged entry is removed."""
        if not self.enabled:
            return None
        folder = self._entry(kind, key)
        try:
            entry = json.loads((folder / _ENTRY).read_text(encoding="utf-8"))
            data = {name: (folder / name).read_bytes() for name in entry["files"]}
            if any(hashlib.sha256(data[name]).hexdigest() != sha for name, sha in entry["files"].items()):
                raise ValueError(f"{folder}: a file's sha256 differs from the entry's")
            os.utime(folder / _ENTRY)  # recently used: pruned last
        except FileNotFoundError:  # not there, or pruned meanwhile by another export
            return None
        except (OSError, ValueError, KeyError):
            _remove(folder, self.root)
            return None
        return entry, data

    def _write(self, kind: str, key: str, record: dict, files: dict[str, bytes]) -> None:
        if not self.enabled:
            return
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            tmp.mkdir(parents=True, exist_ok=True)
            shas = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
            (tmp / _ENTRY).write_text(json.dumps({**record, "files": shas, "kind": kind}, sort_keys=True), encoding="utf-8")
            self._entry(kind, key).parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, self._entry(kind, key))
            self.stored = True
        except OSError:  # another export stored it first, or the disk is full: the export goes on without
            shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> Iterator[tuple[str, Path, int, float]]:
        """(kind, folder, bytes, last use) of every entry."""
        if not self.enabled:
            return
        for kind in KINDS:
            for folder in sorted((self.root / kind).glob("*")) if (self.root / kind).is_dir() else ():
                try:
                    used = (folder / _ENTRY).stat().st_mtime
                    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                except FileNotFoundError:
                    continue
                yield kind, folder, size, used

    def info(self) -> dict:
        by_kind = {kind: {"entries": 0, "bytes": 0} for kind in KINDS}
        for kind, _, size, _ in self.entries():
            by_kind[kind]["entries"] += 1
            by_kind[kind]["bytes"] += size
        return {"dir": str(self.root), "bytes": sum(k["bytes"] for k in by_kind.values()),
                "max_bytes": self.max_bytes, "kinds": by_kind}

    def prune(self, max_bytes: int | None = None) -> dict:
        """Remove the least recently used entries until the cache holds at most max_bytes (default:
        its bound), and temporary folders an export killed mid-write left over an hour ago."""
        bound = self.max_bytes if max_bytes is None else max_bytes
        entries = sorted(self.entries(), key=lambda e: e[3])
        total, removed, freed = sum(e[2] for e in entries), 0, 0
        for _, folder, size, _ in entries:
            if total <= bound:
                break
            _remove(folder, self.root)
            total, removed, freed = total - size, removed + 1, freed + size
        stale = time.time() - 3600
        for tmp in (self.root / "tmp").glob("*") if self.enabled and (self.root / "tmp").is_dir() else ():
            if tmp.stat().st_mtime < stale:
                shutil.rmtree(tmp, ignore_errors=True)
        return {"removed": removed, "freed_bytes": freed, "bytes": total}


def _remove(folder: Path, root: Path) -> None:
    """Out of sight at once (a rename), then deleted: a reader never sees a half-deleted entry."""
    trash = root / "tmp" / f"removed-{uuid.uuid4().hex}"
    try:
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def parse_size(text: str) -> int:
    """"10GB", "500M", "0" -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise InputError(f"{text!r} is not a size", hint="e.g. 10GB, 500MB or 0")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


# -- an Artifact as a record and back ------------------------------------------------------------

def _artifact_record(a: Artifact) -> dict:
    return {"backend": a.backend, "platforms": list(a.platforms), "files": sorted(a.files), "main_file": a.main_file,
            "methods": [m.as_dict() for m in a.methods], "quantization": dataclasses.asdict(a.quantization),
            "ideal_bytes": a.ideal_bytes, "runtime": dataclasses.asdict(a.runtime), "quality": a.quality,
            "tolerance": a.tolerance.as_dict() if a.tolerance else None, "warnings": list(a.warnings),
            "kv_cache": dataclasses.asdict(a.kv_cache) if a.kv_cache else None,
            "reference": [[case, list(output.names)] for case, output in a.reference_outputs.items()]}


def _artifact_from(r: dict, data: dict[str, bytes]) -> Artifact:
    with np.load(io.BytesIO(data["reference.npz"]), allow_pickle=False) as npz:
        arrays = iter([npz[f"a{i}"] for i in range(len(npz.files))])
        reference = {case: CaseOutput(tuple(names), tuple(next(arrays) for _ in names)) for case, names in r["reference"]}
    return Artifact(
        backend=r["backend"], platforms=tuple(r["platforms"]),
        files={name: data[f"files/{name}"] for name in r["files"]}, main_file=r["main_file"],
        methods=tuple(MethodSpec.from_dict(m) for m in r["methods"]),
        quantization=QuantRecord(**r["quantization"]), ideal_bytes=r["ideal_bytes"], reference_outputs=reference,
        runtime=RuntimeRecord(**r["runtime"]), quality=r["quality"],
        tolerance=Tolerance.from_dict(r["tolerance"]) if r["tolerance"] else None, warnings=tuple(r["warnings"]),
        kv_cache=KvCache(**r["kv_cache"]) if r["kv_cache"] else None)
