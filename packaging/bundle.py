"""Write a bundle: stage every file in a hidden directory beside the destination, check it, then
rename it into place, so a bundle appears complete or not at all. An export that failed its checks
lands beside it as NAME.failed/ and never replaces NAME/. The archive is deterministic. Readers
verify every file against the manifest's index before trusting it (verify_bundle)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from edgepack.errors import BundleIntegrityError, InputError
from edgepack.packaging.device_smoke import device_files
from edgepack.packaging.manifest import build_manifest, read_manifest, write_manifest
from edgepack.scratch import hold_new_folder, remove_abandoned
from edgepack.stages import Artifact, Bundle, CapturedModel

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_digest(files: dict[str, bytes], main_file: str) -> dict:
    """sha256 and size of an artifact. A file: its bytes. A directory (e.g. CoreML's .mlpackage,
    whose files are keyed `main_file/...`), or a file with the weights its runtime reads beside it
    (`<file>.data`, ONNX past 2 GiB; `<file>.weight`, MNN's converter on a large model): sha256 over
    the UTF-8 lines "<path relative to the directory, or the file's name>\t<sha256 of the file>\n"
    in sorted path order, and the summed size of its files."""
    beside = sorted(rel for rel in files if rel.startswith(main_file + "."))
    if main_file in files and not beside:
        data = files[main_file]
        return {"sha256": sha256_bytes(data), "bytes": len(data)}
    if main_file in files:
        members = sorted((rel.rsplit("/", 1)[-1], files[rel]) for rel in [main_file, *beside])
    else:
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


FAILED_SUFFIX = ".failed"
ARCHIVE_SUFFIX = ".edgepack.zip"
# A name becomes a folder NAME/ (or NAME.failed/) and an archive NAME.edgepack.zip: it must stay
# one path component on every file system a bundle is copied to.
_NAME_MAX_BYTES = 200


def check_bundle_name(name: str) -> None:
    """A bundle name is a plain file name: not empty, no path separator, not '.' or '..', no
    leading dot (hidden, and the staging folders' prefix), no control characters. Any script."""
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif any(sep in name for sep in ("/", "\\", os.sep)):
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with a dot ('.', '..' and hidden names are not bundle names)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif name != name.strip():
        problem = "starts or ends with white space"
    elif name.endswith(FAILED_SUFFIX):
        problem = f"ends with {FAILED_SUFFIX!r}, which marks failed exports"
    elif len(name.encode("utf-8")) > _NAME_MAX_BYTES:
        problem = f"is longer than {_NAME_MAX_BYTES} bytes"
    if problem:
        raise InputError(f"--name {name!r} {problem}",
                         hint="give a plain file name such as 'smollm2-int4'; the bundle goes to --out/NAME/")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(out_dir: Path) -> None:
    """Fail before any work if the bundle could not be written."""
    probe_dir = out_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out {out_dir}: {probe_dir} is not a writable directory",
                         hint="choose an output directory you can write to")


class StagedBundle:
    """A bundle under construction. Leaving the `with` block by an exception removes it. Files and
    folders get the user's umask, as any file they write would (mkdtemp's 0700 is not kept), and
    every file written is indexed for the manifest."""

    def __init__(self, out_dir: Path, name: str):
        self.final = out_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        self.umask = _umask()
        # a staged bundle a killed export left (gigabytes for a 1B model) goes before this one starts
        partial = f".{name}.partial-"
        self.removed = remove_abandoned(out_dir, partial)
        self.root, self._hold = hold_new_folder(out_dir, partial)
        self.root.chmod(0o777 & ~self.umask)
        self.index: dict[str, dict] = {}

    def __enter__(self) -> "StagedBundle":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._hold)

    def write(self, relpath: str, data: bytes, executable: bool = False) -> dict:
        path = self.root / relpath
        for folder in reversed(path.relative_to(self.root).parents[:-1]):
            (self.root / folder).mkdir(mode=0o777 & ~self.umask, exist_ok=True)
        path.write_bytes(data)
        path.chmod((0o777 if executable else 0o666) & ~self.umask)
        self.index[relpath] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        return dict(self.index[relpath])

    def write_array(self, relpath: str, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        self.write(relpath, buffer.getvalue())
        return relpath


def stage_contents(staging: StagedBundle, captured: CapturedModel, quantization: dict, artifacts: list[Artifact],
                   failures: list[dict]) -> dict:
    """Write artifacts, tokenizer files (byte for byte) and smoke cases; return the manifest draft
    (`quantization` is its quantization section)."""
    artifact_files = {}
    for art in artifacts:
        for relpath, data in sorted(art.files.items()):
            staging.write(relpath, data)
        artifact_files[art.backend] = artifact_digest(art.files, art.main_file)
    tok = captured.loaded.tokenizer
    tokenizer_files = [{"path": path, **staging.write(path, data)}
                       for path, data in (tok.file_bytes("tokenizer/") if tok else {}).items()]
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
    for relpath, data, executable in device_files(captured, artifacts):
        staging.write(relpath, data, executable)
    return build_manifest(captured, quantization, artifacts, artifact_files, tokenizer_files, case_files, failures)


def write_archive(root: Path, archive: Path, prefix: str) -> None:
    """Sorted entries under `prefix/`, fixed timestamps and permissions (0755 for the smoke scripts,
    0644 for the rest): the same files give the same bytes. Each file is streamed in (a 1B
    model's .pte read whole, then compressed whole, held two copies: 1.8 GB)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in files:
            info = zipfile.ZipInfo(f"{prefix}/{path.relative_to(root).as_posix()}", date_time=_ZIP_TIME)
            info.external_attr = (0o755 if path.stat().st_mode & 0o100 else 0o644) << 16
            info.compress_type, info.file_size = zipfile.ZIP_DEFLATED, path.stat().st_size  # the size decides zip64
            with path.open("rb") as src, zf.open(info, "w") as dest:
                shutil.copyfileobj(src, dest, 1 << 20)


def commit(staging: StagedBundle, manifest: dict, *, passed: bool) -> Bundle:
    """Write the manifest (with the index of every file) and the archive, then move the staged
    directory into place: to NAME/ when the export passed, replacing an earlier bundle only then;
    to NAME.failed/ (replacing an earlier failed one) when it did not, so a failed export never
    touches a good bundle."""
    manifest["files"] = [{"path": path, **info} for path, info in sorted(staging.index.items())]
    write_manifest(manifest, staging.root / "manifest.json")
    name = staging.final.name
    final = staging.final if passed else staging.final.with_name(name + FAILED_SUFFIX)
    archive_name = f"{name}{ARCHIVE_SUFFIX}"
    tmp_archive = staging.root / f".{archive_name}.partial"  # inside the held folder: a killed export's goes with it
    write_archive(staging.root, tmp_archive, prefix=name)
    os.replace(tmp_archive, staging.root / archive_name)
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(staging.root, final)
        except OSError:
            os.replace(old, final)  # put the earlier bundle back before reporting
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging.root, final)
    return Bundle(final, final / archive_name, manifest)


def _inside(bundle: Path, relpath: str) -> Path:
    """The file `relpath` names inside `bundle`, refusing paths that leave it (absolute, '..',
    or through a symbolic link)."""
    if not relpath or Path(relpath).is_absolute() or ".." in Path(relpath).parts or "\\" in relpath:
        raise BundleIntegrityError(f"{bundle}: the manifest names a path outside the bundle: {relpath!r}",
                                   hint="the manifest was edited by hand or is not an edgepack manifest; re-export")
    path = bundle / relpath
    root = bundle.resolve()
    if not path.resolve().is_relative_to(root):
        raise BundleIntegrityError(f"{bundle}: {relpath} leads outside the bundle (a symbolic link)",
                                   hint="copy the bundle with its files, not links; or re-export")
    return path


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def referenced_paths(manifest: dict) -> list[str]:
    """Every file or folder path the manifest's sections name (all of them must be indexed)."""
    paths = [a["path"] for a in manifest["artifacts"]]
    paths += [f["path"] for f in (manifest.get("tokenizer") or {}).get("files", [])]
    for case in manifest["smoke"]["cases"]:
        paths += [i["path"] for i in case["inputs"]]
        paths += [ref["path"] for refs in case["expected"].values() for ref in refs.values()]
    return paths


def verify_bundle(bundle: Path, manifest: dict) -> None:
    """Refuse a bundle whose files are not exactly those its manifest indexes: every indexed file
    present with its sha256 and size, every path inside the bundle, every path the manifest's
    sections name indexed, and no other file (the archive aside, which holds the manifest)."""
    index = {}
    for entry in manifest["files"]:
        path = _inside(bundle, entry["path"])
        if not path.is_file():
            raise BundleIntegrityError(f"{bundle}: {entry['path']} is missing (the manifest lists it)",
                                       hint="restore the bundle from its archive or re-export")
        found = _file_digest(path)
        if found != {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
            raise BundleIntegrityError(
                f"{bundle}: {entry['path']} does not match the manifest (sha256 {found['sha256'][:12]}…, "
                f"{found['bytes']} bytes; the manifest says {entry['sha256'][:12]}…, {entry['bytes']} bytes)",
                hint="the file was changed after export; restore the bundle from its archive or re-export")
        index[entry["path"]] = entry
    for relpath in referenced_paths(manifest):
        _inside(bundle, relpath)
        if relpath not in index and not any(p.startswith(relpath.rstrip("/") + "/") for p in index):
            raise BundleIntegrityError(f"{bundle}: the manifest names {relpath}, which its file index does not list",
                                       hint="the manifest was edited by hand; re-export")
    own = {"manifest.json", f"{manifest['name']}{ARCHIVE_SUFFIX}"}
    extra = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(bundle).as_posix() not in set(index) | own)
    if extra:
        raise BundleIntegrityError(f"{bundle}: {len(extra)} file(s) the manifest does not list: {', '.join(extra[:5])}"
                                   + (" ..." if len(extra) > 5 else ""),
                                   hint="a bundle holds only what edgepack wrote; remove them or re-export")


def read_bundle(bundle: Path) -> dict:
    """A bundle's manifest, after checking the bundle holds exactly the files it indexes."""
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    return manifest
