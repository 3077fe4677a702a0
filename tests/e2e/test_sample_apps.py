"""The sample apps read the real bundle format and pin the runtimes `edgepack export` prints.

The Kotlin and Swift code cannot be compiled here (no Android SDK, no Xcode): these tests check
what can be checked without them. The keys the apps read (sample_apps/bundle_keys.json) exist in
the manifest schema, in a real export and as literals in the apps' sources, and the versions the
apps pin are the ones the integration table derives from a real export."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from types import SimpleNamespace

import numpy as np
import pytest

from edgepack.cases import Case, CaseOutput, Tolerance
from edgepack.exporters.backend import release_line
from edgepack.exporters.tflite.app_lines import RELEASES as LITERT_RELEASES
from edgepack.packaging.device_smoke import cases_json
from edgepack.packaging.integration import integration_snippets
from edgepack.packaging.manifest import schema
from tests.conftest import APP_KEYS as KEYS
from tests.conftest import SAMPLE_APPS as APPS


def _resolve(value, path: list[str]) -> list:
    """Every value `path` reaches in `value` (a[] = each element, * = each key's value)."""
    if not path:
        return [value]
    head, rest = path[0], path[1:]
    found = []
    if head == "*":
        for child in (value.values() if isinstance(value, dict) else []):
            found += _resolve(child, rest)
        return found
    key, each = head.removesuffix("[]"), head.endswith("[]")
    if not isinstance(value, dict) or key not in value:
        return []
    children = value[key] if each else [value[key]]
    for child in children if isinstance(children, list) else []:  # a null array reaches nothing
        found += _resolve(child, rest)
    return found


def _properties(node: dict) -> dict:
    """A schema node's properties, through $ref and allOf."""
    if "$ref" in node:
        return _properties(schema()["$defs"][node["$ref"].rsplit("/", 1)[1]])
    found = dict(node.get("properties", {}))
    for part in node.get("allOf", []):
        found = {**_properties(part), **found}
    return found


def _in_schema(node: dict, path: list[str]) -> bool:
    for head in path:
        node = _properties(node).get(head.removesuffix("[]"))
        if node is None:
            return False
        if head.endswith("[]"):
            node = node.get("items", {})
    return True


@pytest.mark.parametrize("key", KEYS["manifest.json"])
def test_manifest_keys_the_apps_read_are_in_the_schema_and_a_real_export(key, llama_export):
    path = key.split(".")
    assert _in_schema(schema(), path), f"{key} is not in manifest.schema.json"
    manifest = json.loads((llama_export[2] / "manifest.json").read_text())
    assert _resolve(manifest, path), f"{key} is not in a real export's manifest.json"


@pytest.mark.parametrize("key", KEYS["smoke/cases.json"])
def test_cases_json_keys_the_apps_read_are_in_a_real_export(key, llama_export):
    cases = json.loads((llama_export[2] / "smoke/cases.json").read_text())
    assert _resolve(cases, key.split(".")), f"{key} is not in a real export's smoke/cases.json"


def test_cases_json_of_an_encoder_carries_its_output_tensors():
    ids = np.array([[0, 5, 9]], dtype=np.int64)
    hidden = np.arange(6, dtype=np.float32).reshape(1, 3, 2) / 7
    case = Case("sentence", "tensors", "forward", (ids, np.ones_like(ids)), ("input_ids", "attention_mask"))
    artifact = SimpleNamespace(backend="tflite", reference_outputs={"sentence": CaseOutput(("output_0",), (hidden,))})
    captured = SimpleNamespace(cases=(case,), tolerance=Tolerance(0.99, None))
    cases = json.loads(cases_json(captured, [artifact]))
    greedy_only = "cases[].expected.*.tokens"
    for key in KEYS["smoke/cases.json, cases of kind tensors"] + [k for k in KEYS["smoke/cases.json"] if k != greedy_only]:
        assert _resolve(cases, key.split(".")), key
    out = cases["cases"][0]["expected"]["tflite"]["output_0"]
    assert out["shape"] == [1, 3, 2] and np.array_equal(np.float32(out["data"]), hidden.ravel())


def test_apps_pin_the_runtimes_export_prints(llama_export):
    manifest = json.loads((llama_export[2] / "manifest.json").read_text())
    snippets = integration_snippets(manifest)
    toml = (APPS / "android/gradle/libs.versions.toml").read_text()
    pinned = dict(re.findall(r'^(\w[\w-]*) = "([^"]+)"$', toml, re.M))
    [executorch] = snippets["gradle"]
    assert executorch == f'implementation("org.pytorch:executorch-android:{pinned["executorch"]}")'
    # what a TFLite export records: the installed LiteRT interpreter's version (exporters/tflite/lower.py)
    litert = LITERT_RELEASES[release_line(version("ai-edge-litert"))]
    assert litert == f"com.google.ai.edge.litert:litert:{pinned['litert']}"
    package = (APPS / "ios/Package.swift").read_text()
    assert snippets["swiftpm"][0].removeprefix(".package(").removesuffix(")") in package
    for product in snippets["swiftpm"][1:]:
        assert product in package, product


def test_the_key_checks_reject_a_key_that_is_not_there(llama_export):
    manifest = json.loads((llama_export[2] / "manifest.json").read_text())
    assert not _in_schema(schema(), ["tokenizer", "eos"])
    assert not _resolve(manifest, ["artifacts[]", "runtime", "maven"])

