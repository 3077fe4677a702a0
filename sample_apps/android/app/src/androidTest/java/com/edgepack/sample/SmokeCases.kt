package com.edgepack.sample

import java.io.File
import kotlin.math.abs
import kotlin.math.sqrt
import org.json.JSONObject

/**
 * The bundle's smoke/cases.json (written by edgepack's packaging/device_smoke.py): the golden
 * inputs and each backend's expected greedy tokens or output tensors, and the tolerance.
 */
class SmokeCases(file: File) {
    class Case(
        val name: String,
        val kind: String,
        val method: String,
        val steps: Int,
        val inputs: List<InputTensor>,
        val expected: JSONObject, // backend -> {"tokens": [...]} or {output name: {"shape", "data"}}
    )

    private val json = JSONObject(file.readText())
    val minCosine: Double = json.getJSONObject("tolerance").getDouble("min_cosine")
    val maxAbs: Double? = json.getJSONObject("tolerance").let { if (it.isNull("max_abs")) null else it.getDouble("max_abs") }
    val cases: List<Case>

    init {
        check(json.getInt("format") == 1) { "cases.json format ${json.getInt("format")}: this app reads format 1" }
        cases = json.getJSONArray("cases").objects().map { c ->
            Case(
                c.getString("name"), c.getString("kind"), c.getString("method"), c.getInt("steps"),
                c.getJSONArray("inputs").objects().map { i ->
                    val data = i.getJSONArray("data")
                    InputTensor(i.getString("name"), i.getString("dtype"),
                        i.getJSONArray("shape").ints().toIntArray(), DoubleArray(data.length()) { data.getDouble(it) })
                },
                c.getJSONObject("expected"),
            )
        }
    }

    /** One case through one artifact: metrics and the reasons it fails the tolerance. */
    class Verdict(val metrics: Map<String, String>, val failures: List<String>)

    fun judge(runner: ArtifactRunner, backend: String, case: Case): Verdict {
        val expected = case.expected.getJSONObject(backend)
        return if (case.kind == "greedy") greedy(runner, case, expected) else tensors(runner, case, expected)
    }

    /** Prefill the prompt, then feed back the argmax one token at a time (edgepack's decode_greedy). */
    private fun greedy(runner: ArtifactRunner, case: Case, expected: JSONObject): Verdict {
        val want = expected.getJSONArray("tokens").let { t -> LongArray(t.length()) { t.getLong(it) } }
        var input = LongArray(case.inputs[0].data.size) { case.inputs[0].data[it].toLong() }
        var pos = 0L
        val got = LongArray(case.steps)
        for (step in 0 until case.steps) {
            val logits = runner.forward(input, pos)
            got[step] = logits.indices.maxBy { logits[it] }.toLong()
            pos += input.size
            input = longArrayOf(got[step])
        }
        val mismatch = (0 until case.steps).firstOrNull { got[it] != want[it] }
        val failures = if (mismatch == null) emptyList() else listOf(
            "greedy tokens differ from step $mismatch: expected ${want[mismatch]}, got ${got[mismatch]}")
        return Verdict(mapOf("tokens_match" to (mismatch == null).toString(),
            "first_token_mismatch" to (mismatch?.toString() ?: "")), failures)
    }

    /** Every output row by row (the last dimension), as edgepack's compare does. */
    private fun tensors(runner: ArtifactRunner, case: Case, expected: JSONObject): Verdict {
        val outputs = runner.run(case.method, case.inputs)
        var minCos = 1.0
        var maxDiff = 0.0
        val failures = mutableListOf<String>()
        outputs.forEachIndexed { i, actual ->
            val ref = expected.getJSONObject("output_$i")
            val shape = ref.getJSONArray("shape").ints().toIntArray()
            if (!shape.contentEquals(actual.shape)) {
                failures += "shape mismatch: output_$i expected ${shape.toList()}, got ${actual.shape.toList()}"
                return@forEachIndexed
            }
            val want = ref.getJSONArray("data").let { d -> DoubleArray(d.length()) { d.getDouble(it) } }
            val row = shape.lastOrNull() ?: 1
            for (start in want.indices step row) {
                var dot = 0.0; var a2 = 0.0; var b2 = 0.0
                for (j in start until start + row) {
                    val a = want[j]; val b = actual.data[j].toDouble()
                    dot += a * b; a2 += a * a; b2 += b * b
                    maxDiff = maxOf(maxDiff, abs(a - b))
                }
                val cos = if (a2 * b2 > 0) dot / sqrt(a2 * b2) else if (a2 == b2) 1.0 else 0.0
                minCos = minOf(minCos, cos)
            }
        }
        if (minCos < minCosine) failures += "cosine $minCos < $minCosine"
        maxAbs?.let { if (maxDiff > it) failures += "max abs diff $maxDiff > $it" }
        return Verdict(mapOf("min_cosine" to minCos.toString(), "max_abs_diff" to maxDiff.toString()), failures)
    }
}
