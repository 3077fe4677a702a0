#!/usr/bin/env bash
# edgepack device smoke on iOS: run_ios.sh BUNDLE_DIR OUT_DIR
#
# Runs the sample app's XCTest (edgepack's sample_apps/ios, a Swift package) on a booted iOS
# Simulator with xcodebuild: the CoreML .mlpackage (CPU compute units) and the ExecuTorch .pte
# replay every golden case against the manifest's tolerance; the JUnit XML lands in
# OUT_DIR/junit-ios.xml. Boots nothing: boot a simulator first (xcrun simctl boot "iPhone 16").
# The simulator runs the Mac's CPU: its numerics can differ from a device's.
#
# Needs: macOS with Xcode (xcrun, simctl, xcodebuild) and
#   EDGEPACK_IOS_PACKAGE     the sample_apps/ios folder
#   EDGEPACK_SIMULATOR       a simulator UDID (default: the first booted one)
#   EDGEPACK_IOS_SCHEME      the package's scheme (default EdgepackSample)
# Exit: 0 every case passed, 1 a case failed or the test did not complete, 2 bad usage,
#       3 Xcode, a booted simulator or the sample app is missing (nothing ran).
set -euo pipefail

missing() { echo "edgepack: $*" >&2; exit 3; }

[ $# -eq 2 ] || { echo "usage: $0 BUNDLE_DIR OUT_DIR" >&2; exit 2; }
bundle=$1 out=$2
[ -f "$bundle/manifest.json" ] && [ -f "$bundle/smoke/cases.json" ] \
  || { echo "edgepack: $bundle is not an edgepack bundle with smoke/cases.json" >&2; exit 2; }
mkdir -p "$out"
bundle=$(cd "$bundle" && pwd) out=$(cd "$out" && pwd)

command -v xcrun >/dev/null || missing "xcrun not found: iOS Simulator runs need macOS with Xcode (install Xcode, then xcode-select -s /Applications/Xcode.app)"
xcodebuild=$(xcrun --find xcodebuild 2>/dev/null) || missing "xcodebuild not found: install Xcode (the command line tools alone have no simulator)"

package=${EDGEPACK_IOS_PACKAGE:-}
[ -f "$package/Package.swift" ] || missing "the sample app is missing (EDGEPACK_IOS_PACKAGE='$package'): point it at edgepack's sample_apps/ios"

udid=${EDGEPACK_SIMULATOR:-$(xcrun simctl list devices booted | grep -m1 -oE '[0-9A-F]{8}-([0-9A-F]{4}-){3}[0-9A-F]{12}' || true)}
[ -n "$udid" ] || missing "no booted iOS Simulator: boot one first, e.g. xcrun simctl boot 'iPhone 16'"

# xcodebuild passes TEST_RUNNER_<name> to the test process as <name>; the simulator reads the
# Mac's file system, so the test opens the bundle in place and writes the report into OUT_DIR.
rm -rf "$out/junit-ios.xml" "$out/ios.xcresult"
status=0
(cd "$package" && TEST_RUNNER_EDGEPACK_BUNDLE="$bundle" TEST_RUNNER_EDGEPACK_JUNIT="$out/junit-ios.xml" \
  "$xcodebuild" test -scheme "${EDGEPACK_IOS_SCHEME:-EdgepackSample}" -destination "id=$udid" \
  -resultBundlePath "$out/ios.xcresult") || status=1
if [ ! -s "$out/junit-ios.xml" ]; then
  echo "edgepack: the smoke test wrote no JUnit report ($out/junit-ios.xml)" >&2
  status=1
fi
exit $status
