"""The manifest's sha256 and bytes of an artifact (packaging.bundle.artifact_digest): one file's
own; for a directory, or a file with the weights its runtime reads beside it (ONNX's
`model.onnx.data` past 2 GiB, MNN's `model.mnn.weight` from a large model), a digest over every
file's, so `bytes` is what an app ships and `sha256` changes with any of them."""

import hashlib

from edgepack.packaging.bundle import artifact_digest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_alone_is_its_own_digest():
    files = {"mnn/model.mnn": b"graph", "mnn/config.json": b"{}", "onnx/model.onnx": b"other"}
    assert artifact_digest(files, "mnn/model.mnn") == {"sha256": sha(b"graph"), "bytes": 5}


def test_a_file_with_weights_beside_it_counts_them():
    files = {"mnn/model.mnn": b"graph", "mnn/model.mnn.weight": b"weights!", "mnn/config.json": b"{}"}
    lines = f"model.mnn\t{sha(b'graph')}\nmodel.mnn.weight\t{sha(b'weights!')}\n"
    assert artifact_digest(files, "mnn/model.mnn") == {"sha256": sha(lines.encode()), "bytes": 13}
    changed = artifact_digest({**files, "mnn/model.mnn.weight": b"weights?"}, "mnn/model.mnn")
    assert changed["bytes"] == 13 and changed["sha256"] != sha(lines.encode())


def test_a_directory_digests_its_files():
    files = {"coreml/m.mlpackage/a": b"1", "coreml/m.mlpackage/b/c": b"22"}
    lines = f"a\t{sha(b'1')}\nb/c\t{sha(b'22')}\n"
    assert artifact_digest(files, "coreml/m.mlpackage") == {"sha256": sha(lines.encode()), "bytes": 3}
