import EdgepackSample
import Foundation
import XCTest

/// Every iOS artifact of a bundle the sample app links a runtime for (Core ML on the CPU, ExecuTorch),
/// each golden case of smoke/cases.json against the expected outputs with the manifest's tolerance.
/// The bundle and the report path come from the environment (smoke/run_ios.sh passes them through
/// xcodebuild as TEST_RUNNER_EDGEPACK_BUNDLE / TEST_RUNNER_EDGEPACK_JUNIT); the report is the JUnit
/// format edgepack's packaging/device_smoke.py reads. On the Simulator the Mac's CPU computes:
/// its numerics can differ from a device's.
final class SmokeTests: XCTestCase {
    func testEveryIOSArtifactAnswersTheGoldenCases() throws {
        let env = ProcessInfo.processInfo.environment
        guard let bundlePath = env["EDGEPACK_BUNDLE"], let reportPath = env["EDGEPACK_JUNIT"] else {
            throw XCTSkip("set EDGEPACK_BUNDLE (a bundle directory) and EDGEPACK_JUNIT (the report path)")
        }
        let bundle = URL(fileURLWithPath: bundlePath)
        let manifest = try BundleManifest(directory: bundle)
        let smoke = try SmokeCases(url: bundle.appendingPathComponent("smoke/cases.json"))
        var report = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"edgepack ios\">\n"
        report += "  <properties><property name=\"note\" value=\"iOS Simulator: the Mac's CPU computes; numerics can differ from a device's\"/></properties>\n"
        var failed: [String] = []
        for artifact in manifest.artifacts where artifact.platforms.contains("ios") {
            var suite = ""
            do {
                if let runner = try openRunner(manifest, artifact, method: smoke.cases.first?.method ?? "forward") {
                    for c in smoke.cases {
                        let start = Date()
                        let verdict = try smoke.judge(runner, backend: artifact.backend, case: c)
                        suite += testcase(artifact.backend, c.name, Date().timeIntervalSince(start), verdict.metrics,
                                          verdict.failures.map { "<failure message=\"\(xml($0))\"/>" }.joined())
                        failed += verdict.failures.map { "\(artifact.backend)/\(c.name): \($0)" }
                    }
                } else {
                    let why = "the iOS sample app has no \(artifact.runtimeName) runtime"
                    suite = smoke.cases.map { testcase(artifact.backend, $0.name, 0, [:], "<skipped message=\"\(xml(why))\"/>") }.joined()
                }
            } catch { // an artifact the runtime cannot load or run fails its cases
                suite = smoke.cases.map { testcase(artifact.backend, $0.name, 0, [:], "<error message=\"\(xml("\(error)"))\"/>") }.joined()
                failed.append("\(artifact.backend): \(error)")
            }
            report += "  <testsuite name=\"edgepack.\(artifact.backend)\">\n\(suite)  </testsuite>\n"
        }
        report += "</testsuites>\n"
        try report.write(toFile: reportPath, atomically: true, encoding: .utf8)
        print("edgepack: iOS Simulator numerics can differ from a device's (the Mac's CPU computes here)")
        XCTAssert(failed.isEmpty, failed.joined(separator: "\n"))
    }

    private func testcase(_ backend: String, _ name: String, _ seconds: Double, _ metrics: [String: String], _ body: String) -> String {
        let properties = metrics.sorted { $0.key < $1.key }.map { "<property name=\"\($0.key)\" value=\"\(xml($0.value))\"/>" }.joined()
        return "    <testcase classname=\"edgepack.\(backend)\" name=\"\(xml(name))\" time=\"\(seconds)\"><properties>\(properties)</properties>\(body)</testcase>\n"
    }

    private func xml(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}
