"""`edgepack smoke BUNDLE --on android-emulator|ios-simulator`: the golden cases on the runtimes an
app ships, through the sample apps' instrumented tests (sample_apps/android, sample_apps/ios).

Every bundle carries what those tests read and the scripts release CI calls (device_files):
  smoke/cases.json       the golden cases as plain JSON (token ids, shapes, each backend's expected
                         greedy tokens or output tensors, the tolerance), so the Kotlin and Swift
                         code needs no .npy reader
  smoke/run_android.sh   adb: installs the sample app and its test APK, pushes the bundle, runs the
                         instrumented test, fetches its JUnit XML; boots nothing
  smoke/run_ios.sh       xcrun simctl + xcodebuild test on a booted simulator, writes the JUnit XML

The device judges its own outputs with the manifest's tolerance (greedy LMs: exact token ids;
encoders: per-row cosine and max abs diff) and reports one JUnit testcase per backend and case:
classname "edgepack.<backend>", name = the case, <property> elements with the metrics
(tokens_match, first_token_mismatch, min_cosine, max_abs_diff), <failure> when out of tolerance,
<error> when the artifact could not run, <skipped> when the app has no runtime for it. Python
reads that file into the same results `edgepack smoke` prints; a case with no testcase, or a
script that failed while its report says pass, is a failure: nothing passes that did not run."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import edgepack
from edgepack.errors import EXIT_ENVIRONMENT_MISSING, EdgepackError, RuntimeUnavailableError
from edgepack.exporters.registry import BACKENDS
from edgepack.packaging.smoke import BackendSmoke

SCRIPTS_DIR = Path(__file__).with_name("device_scripts")
CASES_FORMAT = 1
SAMPLE_APPS = Path(edgepack.__file__).resolve().parent.parent / "sample_apps"
RUN_TIMEOUT_S = 3600


class DeviceEnvMissing(EdgepackError):
    """The tool or device a device smoke run needs is not here (adb, a booted emulator, Xcode)."""

    exit_code = EXIT_ENVIRONMENT_MISSING


@dataclass(frozen=True)
class DeviceTarget:
    platform: str  # the manifest's artifacts[].platforms value
    script: str  # under the bundle's smoke/
    junit: str  # the report the script leaves in its output folder
    runs: frozenset[str]  # backends the sample app has a runtime for
    # environment variable -> default under sample_apps/ (used when that file exists)
    defaults: dict[str, str] = field(default_factory=dict)


TARGETS = {
    "android-emulator": DeviceTarget(
        "android", "run_android.sh", "junit-android.xml", frozenset(b for b, e in BACKENDS.items() if "android" in e.apps),
        {"EDGEPACK_ANDROID_APK": "android/app/build/outputs/apk/debug/app-debug.apk",
         "EDGEPACK_ANDROID_TEST_APK": "android/app/build/outputs/apk/androidTest/debug/app-debug-androidTest.apk"}),
    "ios-simulator": DeviceTarget(
        "ios", "run_ios.sh", "junit-ios.xml", frozenset(b for b, e in BACKENDS.items() if "ios" in e.apps),
        {"EDGEPACK_IOS_PACKAGE": "ios"}),
}


def _tensor(array: np.ndarray) -> dict:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


def cases_json(captured, artifacts) -> bytes:
    """smoke/cases.json: what the apps' smoke tests replay and expect, per backend."""
    cases = []
    for case in captured.cases:
        expected = {}
        for art in artifacts:
            out = art.reference_outputs[case.name]
            expected[art.backend] = ({"tokens": out.get("tokens").tolist()} if case.kind == "greedy"
                                     else {n: _tensor(a) for n, a in zip(out.names, out.arrays)})
        cases.append({"name": case.name, "kind": case.kind, "method": case.method, "steps": case.steps,
                      "inputs": [{"name": n, **_tensor(a)} for n, a in zip(case.input_names, case.inputs)],
                      "expected": expected})
    payload = {"format": CASES_FORMAT, "tolerance": captured.tolerance.as_dict(), "cases": cases}
    return (json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def device_files(captured, artifacts) -> list[tuple[str, bytes, int]]:
    """(path in the bundle, bytes, executable) of the device smoke files every bundle carries."""
    files = [("smoke/cases.json", cases_json(captured, artifacts), False)]
    for target in TARGETS.values():
        files.append((f"smoke/{target.script}", (SCRIPTS_DIR / target.script).read_bytes(), True))
    return files


@dataclass
class DeviceSmoke:
    results: list[BackendSmoke]
    not_run: dict[str, str]  # backend -> why it did not run there
    report: Path | None  # the JUnit XML, when the caller asked to keep it


def _metrics(testcase: ET.Element) -> dict:
    """One testcase's metrics and failures, typed as the host smoke reports them."""
    metrics: dict = {}
    for prop in testcase.iter("property"):
        name, value = prop.get("name"), prop.get("value", "")
        if name == "tokens_match":
            metrics[name] = value == "true"
        elif name == "first_token_mismatch":
            metrics[name] = int(value) if value else None
        elif name in ("min_cosine", "max_abs_diff"):
            metrics[name] = float(value)
    metrics["failures"] = [f.get("message") or (f.text or "").strip() for f in testcase.findall("failure")]
    return metrics


def read_junit(path: Path) -> dict[tuple[str, str], ET.Element]:
    """(backend, case) -> testcase, from the report the sample apps write."""
    found = {}
    for testcase in ET.parse(path).getroot().iter("testcase"):
        classname = testcase.get("classname", "")
        if classname.startswith("edgepack."):
            found[(classname.removeprefix("edgepack."), testcase.get("name", ""))] = testcase
    return found


def _judge(backend: str, where: str, case_names: list[str], junit: dict, not_run: dict) -> BackendSmoke | None:
    """The device's verdict on one backend, or None (recorded in not_run) when the app skipped it."""
    result = BackendSmoke(backend, f"{backend} {where}", passed=True)
    for name in case_names:
        testcase = junit.get((backend, name))
        if testcase is None:
            result.cases[name] = {"failures": ["no result in the device's JUnit report"]}
            result.passed = False
            continue
        if (skipped := testcase.find("skipped")) is not None:
            not_run[backend] = skipped.get("message") or "skipped by the sample app"
            return None
        if (error := testcase.find("error")) is not None:
            result.passed = False
            result.error = error.get("message") or (error.text or "").strip() or "error"
            continue
        result.cases[name] = _metrics(testcase)
        result.passed &= not result.cases[name]["failures"]
    return result


def _environment(target: DeviceTarget) -> dict[str, str]:
    env = dict(os.environ)
    for variable, relpath in target.defaults.items():
        if variable not in env and (SAMPLE_APPS / relpath).exists():
            env[variable] = str(SAMPLE_APPS / relpath)
    return env


def smoke_device(bundle: Path, manifest: dict, on: str, backends: list[str] | None = None,
                 report_dir: Path | None = None) -> DeviceSmoke:
    target = TARGETS[on]
    wanted = [a for a in manifest["artifacts"] if not backends or a["backend"] in backends]
    not_run = {a["backend"]: f"not built for {target.platform} (platforms: {', '.join(a['platforms'])})"
               for a in wanted if target.platform not in a["platforms"]}
    not_run.update({a["backend"]: f"the {target.platform} sample app has no {a['runtime']['name']} runtime"
                    for a in wanted if a["backend"] not in not_run and a["backend"] not in target.runs})
    to_run = [a["backend"] for a in wanted if a["backend"] not in not_run]
    if not wanted:
        return DeviceSmoke([], {}, None)
    if not to_run:
        raise RuntimeUnavailableError(f"{bundle}: no artifact here can run on {on}: "
                                      + "; ".join(f"{b}: {why}" for b, why in not_run.items()))
    script = bundle / "smoke" / target.script
    if not script.is_file() or not (bundle / "smoke" / "cases.json").is_file():
        raise RuntimeUnavailableError(f"{bundle}: has no smoke/{target.script} or smoke/cases.json",
                                      hint="export the bundle again with this edgepack")
    with tempfile.TemporaryDirectory(prefix="edgepack-device-") as tmp:
        out = report_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["bash", str(script), str(bundle.resolve()), str(out.resolve())],
                                  env=_environment(target), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            returncode, log, said = done.returncode, (done.stdout + done.stderr).strip(), done.stderr.strip()
        except subprocess.TimeoutExpired as e:
            returncode, log, said = -1, f"timed out after {RUN_TIMEOUT_S} s: {e.stderr or ''}", ""
        if returncode == EXIT_ENVIRONMENT_MISSING:  # the script's last word says what is missing and how to get it
            raise DeviceEnvMissing(f"{on}: {said.splitlines()[-1] if said else 'the environment is missing'}")
        report = out / target.junit
        junit = read_junit(report) if report.is_file() else None
        case_names = [c["name"] for c in manifest["smoke"]["cases"]]
        results = []
        for backend in to_run:
            if junit is None:
                results.append(BackendSmoke(backend, f"{backend} {on}", False,
                                            error=f"no JUnit report from {target.script} (exit {returncode}): {log[-1500:]}"))
            elif (result := _judge(backend, on, case_names, junit, not_run)) is not None:
                results.append(result)
        if not results:
            raise RuntimeUnavailableError(f"{on}: the sample app ran none of the artifacts: "
                                          + "; ".join(f"{b}: {why}" for b, why in not_run.items()))
        if returncode != 0 and junit is not None and all(r.passed for r in results):
            for r in results:
                r.passed, r.error = False, f"{target.script} exited {returncode} although its report has no failure: {log[-1500:]}"
        return DeviceSmoke(results, not_run, report if report_dir else None)
