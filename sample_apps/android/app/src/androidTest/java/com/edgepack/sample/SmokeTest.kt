package com.edgepack.sample

import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import java.io.File
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith

/**
 * Every Android artifact of a bundle through the runtime an app ships (ExecuTorch's Module, LiteRT's
 * Interpreter), each golden case against the expected outputs with the manifest's tolerance. The
 * bundle is a directory on the device: `-e edgepackBundle <dir>` (smoke/run_android.sh pushes it).
 * The per-case report goes to the app's files/edgepack-smoke-junit.xml in the format edgepack's
 * packaging/device_smoke.py reads.
 */
@RunWith(AndroidJUnit4::class)
class SmokeTest {
    @Test
    fun everyAndroidArtifactAnswersTheGoldenCases() {
        val dir = InstrumentationRegistry.getArguments().getString("edgepackBundle")
            ?: error("pass the bundle directory on the device: -e edgepackBundle /data/local/tmp/edgepack/<name>")
        val manifest = BundleManifest(File(dir))
        val smoke = SmokeCases(File(dir, "smoke/cases.json"))
        val report = StringBuilder("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"edgepack android\">\n")
        val failed = mutableListOf<String>()
        for (artifact in manifest.artifacts.filter { "android" in it.platforms }) {
            val suite = StringBuilder()
            try {
                val runner = openRunner(manifest, artifact)
                if (runner == null) {
                    smoke.cases.forEach { suite.case(artifact.backend, it.name, 0.0, emptyMap(),
                        "<skipped message=\"${xml("the Android sample app has no ${artifact.runtimeName} runtime")}\"/>") }
                } else runner.use {
                    for (case in smoke.cases) {
                        val start = System.nanoTime()
                        val verdict = smoke.judge(runner, artifact.backend, case)
                        val seconds = (System.nanoTime() - start) / 1e9
                        suite.case(artifact.backend, case.name, seconds, verdict.metrics,
                            verdict.failures.joinToString("") { "<failure message=\"${xml(it)}\"/>" })
                        verdict.failures.forEach { failed += "${artifact.backend}/${case.name}: $it" }
                    }
                }
            } catch (e: Exception) { // an artifact the runtime cannot load or run fails its cases
                suite.setLength(0)
                smoke.cases.forEach { suite.case(artifact.backend, it.name, 0.0, emptyMap(),
                    "<error message=\"${xml(e.toString())}\"/>") }
                failed += "${artifact.backend}: $e"
            }
            report.append("  <testsuite name=\"edgepack.${artifact.backend}\">\n").append(suite).append("  </testsuite>\n")
        }
        report.append("</testsuites>\n")
        val target = InstrumentationRegistry.getInstrumentation().targetContext
        File(target.filesDir, "edgepack-smoke-junit.xml").writeText(report.toString())
        assertTrue(failed.joinToString("\n"), failed.isEmpty())
    }

    private fun StringBuilder.case(backend: String, name: String, seconds: Double, metrics: Map<String, String>, body: String) {
        append("    <testcase classname=\"edgepack.$backend\" name=\"${xml(name)}\" time=\"$seconds\">")
        append("<properties>")
        metrics.forEach { (k, v) -> append("<property name=\"$k\" value=\"${xml(v)}\"/>") }
        append("</properties>").append(body).append("</testcase>\n")
    }

    private fun xml(text: String) = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\"", "&quot;")
}
