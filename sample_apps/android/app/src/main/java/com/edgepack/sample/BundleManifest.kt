package com.edgepack.sample

import java.io.File
import org.json.JSONArray
import org.json.JSONObject

/**
 * The part of an edgepack bundle's manifest.json the app needs. Every key read here is listed in
 * sample_apps/bundle_keys.json, which a test checks against packaging/manifest.schema.json and a
 * real export, so a manifest change that breaks the app fails in edgepack's own test suite.
 */
class BundleManifest(val dir: File) {
    data class Method(val name: String, val outputs: List<String>)

    data class Artifact(
        val backend: String,
        val path: String,
        val platforms: List<String>,
        val runtimeName: String,
        val runtimeVersion: String,
        val methods: List<Method>,
    )

    private val json = JSONObject(File(dir, "manifest.json").readText())

    val name: String = json.getString("name")
    val task: String = json.getJSONObject("model").getString("task")
    /** tokenizer.json, as ExecuTorch's LlmModule loads it; null for a model without a tokenizer. */
    val tokenizer: File? = json.optJSONObject("tokenizer")?.getJSONArray("files")
        ?.objects()?.map { it.getString("path") }?.firstOrNull { it.endsWith("tokenizer.json") }?.let { File(dir, it) }
    val eosIds: List<Int> = json.optJSONObject("tokenizer")?.getJSONArray("eos_ids")?.ints() ?: emptyList()
    /** BOS tokens the app prepends: the runners' tokenizers do not add them (LlmModule's numBos). */
    val numBos: Int = json.optJSONObject("generation")?.getInt("num_bos") ?: 0
    val maxSeqLen: Int = json.optJSONObject("generation")?.getInt("max_seq_len") ?: 0
    val artifacts: List<Artifact> = json.getJSONArray("artifacts").objects().map { a ->
        val runtime = a.getJSONObject("runtime")
        Artifact(
            backend = a.getString("backend"),
            path = a.getString("path"),
            platforms = a.getJSONArray("platforms").strings(),
            runtimeName = runtime.getString("name"),
            runtimeVersion = runtime.getString("version"),
            methods = a.getJSONArray("methods").objects().map { m ->
                Method(m.getString("name"), m.getJSONArray("outputs").objects().map { it.getString("name") })
            },
        )
    }

    fun artifact(backend: String): Artifact? = artifacts.firstOrNull { it.backend == backend }

    fun file(artifact: Artifact): File = File(dir, artifact.path)
}

internal fun JSONArray.objects(): List<JSONObject> = (0 until length()).map { getJSONObject(it) }

internal fun JSONArray.strings(): List<String> = (0 until length()).map { getString(it) }

internal fun JSONArray.ints(): List<Int> = (0 until length()).map { getInt(it) }
