"""Device smoke (`edgepack smoke --on android-emulator|ios-simulator`) and what every bundle carries
for it. No emulator, simulator, adb or Xcode exists on these machines: the runner scripts are run
for real against fake `adb` / `xcrun` / `xcodebuild` executables that record their arguments and
answer like the real tools (a JUnit report in the sample apps' format, pass or fail), and the
"tool absent" path runs with a PATH that has none of them. No test here claims a device run."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgepack.errors import EXIT_ENVIRONMENT_MISSING
from edgepack.packaging.device_smoke import SCRIPTS_DIR
from tests.conftest import REPO_ROOT, run_cli

SYSTEM_PATH = "/usr/bin:/bin"


def _junit(cases: dict[tuple[str, str], str | None]) -> str:
    """A report as the sample apps write it: (backend, case) -> failure message or None (pass)."""
    rows = "".join(
        f'<testcase classname="edgepack.{backend}" name="{case}" time="0.5"><properties>'
        f'<property name="tokens_match" value="{str(failure is None).lower()}"/>'
        f'<property name="first_token_mismatch" value="{"" if failure is None else 3}"/></properties>'
        + (f'<failure message="{failure}"/>' if failure else "") + "</testcase>"
        for (backend, case), failure in cases.items())
    return f'<?xml version="1.0"?><testsuites><testsuite name="edgepack">{rows}</testsuite></testsuites>'


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + f'echo "{name} $*" >> "$FAKE_LOG"\n' + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A PATH with only the system tools and the fakes a test adds; the log of their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for var in ("ADB", "ANDROID_HOME", "ANDROID_SDK_ROOT", "EDGEPACK_SIMULATOR", "EDGEPACK_IOS_SCHEME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}:{SYSTEM_PATH}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("LC_ALL", "C")
    return bin_dir, tmp_path / "calls.log"


def _android(bin_dir: Path, tmp_path: Path, monkeypatch, report: str, instrument: str) -> tuple[Path, Path]:
    (tmp_path / "junit.xml").write_text(report)
    _fake_tool(bin_dir, "adb", f"""\
        case "$*" in
          get-state) echo device ;;
          "shell am instrument"*) printf '%s\\n' "{instrument}" ;;
          "exec-out run-as"*) cat "{tmp_path / 'junit.xml'}" ;;
        esac
        """)
    apk, test_apk = tmp_path / "app-debug.apk", tmp_path / "app-debug-androidTest.apk"
    apk.write_bytes(b"apk")
    test_apk.write_bytes(b"test apk")
    monkeypatch.setenv("EDGEPACK_ANDROID_APK", str(apk))
    monkeypatch.setenv("EDGEPACK_ANDROID_TEST_APK", str(test_apk))
    return apk, test_apk


def test_every_bundle_carries_the_scripts_and_cases_json(llama_export):
    bundle = llama_export[2]
    for script in ("run_android.sh", "run_ios.sh"):
        path = bundle / "smoke" / script
        assert path.read_bytes() == (SCRIPTS_DIR / script).read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    with zipfile.ZipFile(bundle / "tiny-llama.edgepack.zip") as zf:
        modes = {i.filename: i.external_attr >> 16 for i in zf.infolist()}
    assert modes["tiny-llama/smoke/run_android.sh"] == modes["tiny-llama/smoke/run_ios.sh"] == 0o755
    assert modes["tiny-llama/manifest.json"] == modes["tiny-llama/smoke/cases.json"] == 0o644
    # cases.json says what the .npy files say
    cases = json.loads((bundle / "smoke/cases.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert cases["tolerance"] == manifest["smoke"]["tolerance"] and cases["format"] == 1
    [case] = cases["cases"]
    [ref] = manifest["smoke"]["cases"]
    prompt = np.load(bundle / ref["inputs"][0]["path"])
    assert case["inputs"][0]["shape"] == list(prompt.shape) and case["inputs"][0]["data"] == prompt.ravel().tolist()
    tokens = np.load(bundle / ref["expected"]["executorch"]["tokens"]["path"])
    assert case["expected"] == {"executorch": {"tokens": tokens.tolist()}} and len(tokens) == case["steps"] == 16


def test_android_runner_issues_the_adb_commands_and_passes(llama_export, fake_env, tmp_path, monkeypatch):
    bin_dir, log = fake_env
    bundle = llama_export[2].resolve()
    apk, test_apk = _android(bin_dir, tmp_path, monkeypatch, _junit({("executorch", "greedy"): None}), "OK (1 test)")
    result = run_cli("smoke", bundle, "--on", "android-emulator", "--report-dir", tmp_path / "reports", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["results"]["executorch"]["passed"] and summary["results"]["executorch"]["runtime"] == "executorch android-emulator"
    assert summary["results"]["executorch"]["cases"]["greedy"]["tokens_match"] is True
    assert summary["report"] == str(tmp_path / "reports" / "junit-android.xml")
    device = "/data/local/tmp/edgepack/tiny-llama"
    assert log.read_text().splitlines() == [
        "adb get-state",
        f"adb install -r -t {apk}",
        f"adb install -r -t {test_apk}",
        f"adb shell rm -rf {device}",
        f"adb shell mkdir -p {device}",
        *[f"adb push {bundle / entry} {device}/" for entry in ("executorch", "manifest.json", "smoke", "tokenizer")],
        f"adb shell am instrument -w -r -e class com.edgepack.sample.SmokeTest -e edgepackBundle {device} "
        "com.edgepack.sample.test/androidx.test.runner.AndroidJUnitRunner",
        "adb exec-out run-as com.edgepack.sample cat files/edgepack-smoke-junit.xml",
    ]


def test_a_failing_device_report_fails_the_smoke(llama_export, fake_env, tmp_path, monkeypatch):
    bin_dir, _ = fake_env
    failure = "greedy tokens differ from step 3: expected 17, got 42"
    _android(bin_dir, tmp_path, monkeypatch, _junit({("executorch", "greedy"): failure}), "FAILURES!!!")
    result = run_cli("smoke", llama_export[2], "--on", "android-emulator", "--json")
    assert result.exit_code == 1
    greedy = json.loads(result.stdout)["results"]["executorch"]["cases"]["greedy"]
    assert greedy["failures"] == [failure] and greedy["first_token_mismatch"] == 3


def test_a_report_that_ran_nothing_is_not_a_pass(llama_export, fake_env, tmp_path, monkeypatch):
    bin_dir, _ = fake_env
    _android(bin_dir, tmp_path, monkeypatch, _junit({}), "OK (1 test)")
    result = run_cli("smoke", llama_export[2], "--on", "android-emulator", "--json")
    assert result.exit_code == 1
    greedy = json.loads(result.stdout)["results"]["executorch"]["cases"]["greedy"]
    assert greedy["failures"] == ["no result in the device's JUnit report"]


def test_ios_runner_issues_the_simctl_and_xcodebuild_commands(llama_export, fake_env, tmp_path, monkeypatch):
    bin_dir, log = fake_env
    bundle = llama_export[2].resolve()
    udid = "0A1B2C3D-0000-1111-2222-333344445555"
    _fake_tool(bin_dir, "xcrun", f"""\
        case "$*" in
          "--find xcodebuild") echo "{bin_dir / 'xcodebuild'}" ;;
          "simctl list devices booted") echo "    iPhone 16 ({udid}) (Booted)" ;;
        esac
        """)
    _fake_tool(bin_dir, "xcodebuild", f"""\
        echo "env $TEST_RUNNER_EDGEPACK_BUNDLE $TEST_RUNNER_EDGEPACK_JUNIT $PWD" >> "$FAKE_LOG"
        cat "{tmp_path / 'junit.xml'}" > "$TEST_RUNNER_EDGEPACK_JUNIT"
        exit "$FAKE_XCODEBUILD_EXIT"
        """)
    package = tmp_path / "ios"
    package.mkdir()
    (package / "Package.swift").write_text("// swift-tools-version:5.9\n")
    monkeypatch.setenv("EDGEPACK_IOS_PACKAGE", str(package))
    reports = tmp_path / "reports"
    for exit_code, failure in ((0, None), (65, "greedy tokens differ from step 0: expected 1, got 2")):
        log.unlink(missing_ok=True)
        monkeypatch.setenv("FAKE_XCODEBUILD_EXIT", str(exit_code))
        (tmp_path / "junit.xml").write_text(_junit({("executorch", "greedy"): failure}))
        result = run_cli("smoke", bundle, "--on", "ios-simulator", "--report-dir", reports)
        assert result.exit_code == (0 if failure is None else 1), result.output
        assert "numerics can differ from a device's" in result.stderr
        assert log.read_text().splitlines() == [
            "xcrun --find xcodebuild",
            "xcrun simctl list devices booted",
            f"xcodebuild test -scheme EdgepackSample -destination id={udid} -resultBundlePath {reports}/ios.xcresult",
            f"env {bundle} {reports}/junit-ios.xml {package}",
        ]


@pytest.mark.parametrize("on,tool,says", [
    ("android-emulator", "adb", "adb not found: install the Android SDK platform-tools"),
    ("ios-simulator", "xcrun", "xcrun not found: iOS Simulator runs need macOS with Xcode"),
])
def test_without_the_tool_smoke_exits_3_and_says_what_is_missing(llama_export, fake_env, on, tool, says):
    assert shutil.which(tool, path=os.environ["PATH"]) is None  # really absent, not faked
    result = run_cli("smoke", llama_export[2], "--on", on, "--json")
    assert result.exit_code == EXIT_ENVIRONMENT_MISSING == 3
    assert says in result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "DeviceEnvMissing"


def test_an_unknown_target_lists_the_choices(llama_export):
    result = run_cli("smoke", llama_export[2], "--on", "android")
    assert result.exit_code == 2 and "android-emulator, ios-simulator" in result.stderr


def test_export_prints_the_integration_lines(llama_export):
    integration = llama_export[1]["integration"]
    assert integration["gradle"] == ['implementation("org.pytorch:executorch-android:1.5.1")']
    assert integration["swiftpm"][0] == '.package(url: "https://github.com/pytorch/executorch.git", branch: "swiftpm-1.5.0")'
    assert '.product(name: "kernels_quantized", package: "executorch")' in integration["swiftpm"]


def test_release_workflow_linux_job_runs_what_make_demo_runs():
    demo = subprocess.run(["make", "-s", "-n", "-o", "install", "demo"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    demo = [line for line in demo if line and not line.startswith("#")]
    workflow = yaml.safe_load((REPO_ROOT / ".github/workflows/release.yml").read_text())
    steps = [s["run"] for s in workflow["jobs"]["export"]["steps"] if "run" in s]
    assert steps == ["make install", *demo]
