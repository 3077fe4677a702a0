#!/usr/bin/env bash
# edgepack device smoke on Android: run_android.sh BUNDLE_DIR OUT_DIR
#
# Installs the sample app and its instrumented-test APK on the one device or emulator adb sees
# (or $ANDROID_SERIAL), pushes the bundle, runs the smoke test (every Android artifact through
# ExecuTorch and LiteRT, each golden case compared with the manifest's tolerance), and copies
# its JUnit XML to OUT_DIR/junit-android.xml. Boots nothing: start the emulator first.
#
# Needs: adb (on PATH, $ADB, or $ANDROID_HOME / $ANDROID_SDK_ROOT/platform-tools), and the APKs
# built from edgepack's sample_apps/android (./gradlew assembleDebug assembleDebugAndroidTest):
#   EDGEPACK_ANDROID_APK        app-debug.apk
#   EDGEPACK_ANDROID_TEST_APK   app-debug-androidTest.apk
# Exit: 0 every case passed, 1 a case failed or the test did not complete, 2 bad usage,
#       3 adb, a device or an APK is missing (nothing ran).
set -euo pipefail

APP_ID=com.edgepack.sample
RUNNER="$APP_ID.test/androidx.test.runner.AndroidJUnitRunner"
TEST_CLASS="$APP_ID.SmokeTest"
DEVICE_ROOT=/data/local/tmp/edgepack
REPORT=files/edgepack-smoke-junit.xml  # in the app's data directory, read back with run-as

missing() { echo "edgepack: $*" >&2; exit 3; }

[ $# -eq 2 ] || { echo "usage: $0 BUNDLE_DIR OUT_DIR" >&2; exit 2; }
bundle=$1 out=$2
[ -f "$bundle/manifest.json" ] && [ -f "$bundle/smoke/cases.json" ] \
  || { echo "edgepack: $bundle is not an edgepack bundle with smoke/cases.json" >&2; exit 2; }
mkdir -p "$out"

adb=${ADB:-}
for sdk in "${ANDROID_HOME:-}" "${ANDROID_SDK_ROOT:-}"; do
  [ -z "$adb" ] && [ -n "$sdk" ] && [ -x "$sdk/platform-tools/adb" ] && adb="$sdk/platform-tools/adb"
done
[ -z "$adb" ] && adb=$(command -v adb || true)
[ -n "$adb" ] || missing "adb not found: install the Android SDK platform-tools (sdkmanager 'platform-tools') and put adb on PATH or set ANDROID_HOME"

state=$("$adb" get-state 2>/dev/null || true)
[ "$state" = device ] || missing "no Android device or emulator is ready (adb get-state: '${state:-none}'); boot one first, e.g. emulator -avd <name>"

apk=${EDGEPACK_ANDROID_APK:-} test_apk=${EDGEPACK_ANDROID_TEST_APK:-}
[ -f "$apk" ] && [ -f "$test_apk" ] \
  || missing "the sample app's APKs are missing (EDGEPACK_ANDROID_APK='$apk', EDGEPACK_ANDROID_TEST_APK='$test_apk'): build them in sample_apps/android with ./gradlew assembleDebug assembleDebugAndroidTest"

name=$(basename "$bundle")
device_dir="$DEVICE_ROOT/$name"
"$adb" install -r -t "$apk"
"$adb" install -r -t "$test_apk"
"$adb" shell rm -rf "$device_dir"
"$adb" shell mkdir -p "$device_dir"
for entry in "$bundle"/*; do
  case "$entry" in *.edgepack.zip) continue ;; esac  # the archive repeats the bundle
  "$adb" push "$entry" "$device_dir/"
done

# am instrument exits 0 even when a test fails: its own report decides.
"$adb" shell am instrument -w -r -e class "$TEST_CLASS" -e edgepackBundle "$device_dir" "$RUNNER" \
  | tee "$out/instrument-android.txt"
"$adb" exec-out run-as "$APP_ID" cat "$REPORT" > "$out/junit-android.xml" || true

status=0
grep -q '^OK (' "$out/instrument-android.txt" || status=1
grep -qE 'FAILURES!!!|INSTRUMENTATION_FAILED|Process crashed' "$out/instrument-android.txt" && status=1
if ! grep -q '<testsuites' "$out/junit-android.xml"; then
  echo "edgepack: the smoke test wrote no JUnit report ($APP_ID:$REPORT)" >&2
  rm -f "$out/junit-android.xml"
  status=1
fi
exit $status
