"""Write a bundle: stage every file in a hidden directory beside the destination, then rename it
into place, so a bundle appears complete or not at all. The archive is deterministic."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edgepack.errors import InputError
from edgepack.stages import Artifact, Bundle, CapturedModel
from edgepack.packaging.device_smoke import device_files
from edgepack.packaging.manifest import build_manifest, write_manifest

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_digest(files: dict[str, bytes], main_file: str) -> dict:
    """sha256 and size of an artifact. A file: its bytes. A directory (e.g. CoreML's .mlpackage,
    whose files are keyed `main_file/...`): sha256 over the UTF-8 lines "<path relative to the
    directory>\t<sha256 of the file>\n" in sorted path order, and the summed size of its files."""
    if main_file in files:
        data = files[main_file]
        return {"sha256": sha256_bytes(data), "bytes": len(data)}
    prefix = main_file.rstrip("/") + "/"
    members = sorted((rel[len(prefix):], data) for rel, data in files.items() if rel.startswith(prefix))
    if not members:
        raise ValueError(f"artifact {main_file} has no files")
    lines = "".join(f"{rel}\t{sha256_bytes(data)}\n" for rel, data in members)
    return {"sha256": sha256_bytes(lines.encode("utf-8")), "bytes": sum(len(data) for _, data in members)}


def directory_digest(path: Path) -> dict:
    """artifact_digest of a directory artifact on disk (what a reader checks a bundle with)."""
    files = {f"d/{p.relative_to(path).as_posix()}": p.read_bytes() for p in path.rglob("*") if p.is_file()}
    return artifact_digest(files, "d")


def check_writable(out_dir: Path) -> None:
    """Fail before any work if the bundle could not be written."""
    probe_dir = out_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out {out_dir}: {probe_dir} is not a writable directory",
                         hint="choose an output directory you can write to")


class StagedBundle:
    """A bundle under construction. Leaving the `with` block by an exception removes it."""

    def __init__(self, out_dir: Path, name: str):
        self.final = out_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))

    def __enter__(self) -> "StagedBundle":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def write(self, relpath: str, data: bytes, mode: int = 0o644) -> dict:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        return {"sha256": sha256_bytes(data), "bytes": len(data)}

    def write_array(self, relpath: str, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        self.write(relpath, buffer.getvalue())
        return relpath


def stage_contents(staging: StagedBundle, captured: CapturedModel, quant, artifacts: list[Artifact],
                   failures: list[dict]) -> dict:
    """Write artifacts, tokenizer files (byte for byte) and smoke cases; return the manifest draft."""
    artifact_files = {}
    for art in artifacts:
        for relpath, data in sorted(art.files.items()):
            staging.write(relpath, data)
        artifact_files[art.backend] = artifact_digest(art.files, art.main_file)
    tokenizer_files = []
    tok = captured.loaded.tokenizer
    if tok:
        for name in tok.files:
            info = staging.write(f"tokenizer/{name}", (tok.directory / name).read_bytes())
            tokenizer_files.append({"path": f"tokenizer/{name}", **info})
    case_files = {}
    for case in captured.cases:
        for name, array in zip(case.input_names, case.inputs):
            case_files[(case.name, "input", name)] = staging.write_array(f"smoke/{case.name}/input.{name}.npy", array)
        outputs = {"fp32-eager": captured.fp32_outputs[case.name]}
        outputs.update({a.backend: a.reference_outputs[case.name] for a in artifacts})
        for source, out in outputs.items():
            for name, array in zip(out.names, out.arrays):
                case_files[(case.name, source, name)] = staging.write_array(
                    f"smoke/{case.name}/expected.{source}.{name}.npy", array)
    for relpath, data, mode in device_files(captured, artifacts):
        staging.write(relpath, data, mode)
    return build_manifest(captured, quant, artifacts, artifact_files, tokenizer_files, case_files, failures)


def write_archive(root: Path, archive: Path, prefix: str) -> None:
    """Sorted entries under `prefix/`, fixed timestamps and permissions (0755 for the smoke scripts,
    0644 for the rest): the same files give the same bytes."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in files:
            info = zipfile.ZipInfo(f"{prefix}/{path.relative_to(root).as_posix()}", date_time=_ZIP_TIME)
            info.external_attr = (0o755 if path.stat().st_mode & 0o100 else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes(), compresslevel=6)


def commit(staging: StagedBundle, manifest: dict) -> Bundle:
    """Write the manifest and archive, then move the staged directory into place."""
    write_manifest(manifest, staging.root / "manifest.json")
    final = staging.final
    archive_name = f"{final.name}.edgepack.zip"
    tmp_archive = staging.root.parent / f".{archive_name}.partial-{os.getpid()}"
    try:
        write_archive(staging.root, tmp_archive, prefix=final.name)
        os.replace(tmp_archive, staging.root / archive_name)
    finally:
        tmp_archive.unlink(missing_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging.root, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging.root, final)
    return Bundle(final, final / archive_name, manifest)
