"""Reproducible .mlpackage bytes.

coremltools writes a fresh random UUID for every item of the package's Manifest.json on each
save, and, for programs converted from torch.export, an `executorch_debug_handle_mapping.json`
beside it that no CoreML runtime reads. Here the package is read back file by file with:

- each item UUID replaced by uuid5(EDGEPACK_NAMESPACE, item path): stable, still a valid UUID,
  and the same item always gets the same identifier (Manifest.json rewritten with sorted keys);
- the debug mapping dropped (it is not listed in Manifest.json, so the package is unchanged for
  CoreML);
- model.mlmodel re-serialized with protobuf's deterministic map ordering.

The result is checked to load with coremltools (`MLModel(path, skip_model_load=True)`), so a
rewrite that broke the package fails the export, not the app.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

MANIFEST = "Manifest.json"
MODEL_SPEC = "Data/com.apple.CoreML/model.mlmodel"
DROPPED = ("executorch_debug_handle_mapping.json",)
EDGEPACK_NAMESPACE = uuid.UUID("5f0c7a52-4c1e-4a8e-9d2b-6e64b1f0c0de")


def _stable_manifest(data: bytes) -> bytes:
    manifest = json.loads(data)
    renamed = {}
    for old_id, item in manifest["itemInfoEntries"].items():
        new_id = str(uuid.uuid5(EDGEPACK_NAMESPACE, item["path"])).upper()
        renamed[old_id] = new_id
        manifest.setdefault("_items", {})[new_id] = item
    manifest["itemInfoEntries"] = manifest.pop("_items", {})
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    return (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode()


def _stable_spec(data: bytes) -> bytes:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(data)
    return spec.SerializeToString(deterministic=True)


def package_files(path: Path) -> dict[str, bytes]:
    """Every file of the saved package at `path`, relative to it, with reproducible bytes."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in DROPPED:
            continue
        data = file.read_bytes()
        files[rel] = _stable_manifest(data) if rel == MANIFEST else _stable_spec(data) if rel == MODEL_SPEC else data
    check_loads(files)
    return files


def write_package(files: dict[str, bytes], path: Path) -> None:
    for rel, data in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def check_loads(files: dict[str, bytes]) -> None:
    import coremltools as ct

    with tempfile.TemporaryDirectory(prefix="edgepack-mlpackage-") as tmp:
        path = Path(tmp) / "model.mlpackage"
        write_package(files, path)
        ct.models.MLModel(str(path), skip_model_load=True)
