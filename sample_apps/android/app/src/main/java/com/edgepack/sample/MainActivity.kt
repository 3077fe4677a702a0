package com.edgepack.sample

import android.app.Activity
import android.content.Context
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import kotlin.concurrent.thread
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * A minimal chat screen over the bundle in the app's assets: the .pte through ExecuTorch's own LLM
 * runner (LlmModule: its tokenizer, KV cache and stop tokens, read from the .pte's metadata),
 * greedy, with the BOS count the manifest states. Plain views: no UI library to pin.
 */
class MainActivity : Activity() {
    private lateinit var transcript: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(TextView(this).apply { text = "Preparing the bundle…" })
        // A real model's bundle takes seconds to copy out of the APK: never on the UI thread (ANR).
        thread {
            val manifest = BundleManifest(extractBundle(this))
            runOnUiThread { showChat(manifest) }
        }
    }

    private fun showChat(manifest: BundleManifest) {
        transcript = TextView(this)
        val prompt = EditText(this).apply { hint = "Prompt" }
        val send = Button(this).apply { text = "Send" }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(TextView(context).apply { text = describe(manifest) })
            addView(ScrollView(context).apply { addView(transcript) }, LinearLayout.LayoutParams(-1, 0, 1f))
            addView(prompt)
            addView(send)
        })
        val pte = manifest.artifact("executorch")
        val tokenizer = manifest.tokenizer
        if (manifest.task != "causal-lm" || pte == null || tokenizer == null) {
            transcript.text = "The chat screen needs a decoder LM with an ExecuTorch artifact and a tokenizer; " +
                "this bundle's other artifacts are exercised by the instrumented smoke test."
            send.isEnabled = false
            return
        }
        val llm = LlmModule(manifest.file(pte).absolutePath, tokenizer.absolutePath, 0f)
        send.setOnClickListener {
            val text = prompt.text.toString()
            transcript.append("\n> $text\n")
            send.isEnabled = false
            thread {
                val callback = object : LlmCallback {
                    override fun onResult(result: String) = runOnUiThread { transcript.append(result) }
                }
                llm.generate(text, manifest.maxSeqLen, callback, false, 0f, manifest.numBos, 0)
                runOnUiThread { send.isEnabled = true }
            }
        }
    }

    private fun describe(manifest: BundleManifest): String =
        "${manifest.name} (${manifest.task}), stops at token ids ${manifest.eosIds}\n" +
            manifest.artifacts.filter { "android" in it.platforms }
                .joinToString("\n") { "${it.backend}: ${it.path} on ${it.runtimeName} ${it.runtimeVersion}" }
}

/**
 * The runtimes load files, not assets: copy assets/edgepack/ into the app's files once per install,
 * through a scratch folder renamed at the end, so a copy cut short (the app killed) is redone.
 */
fun extractBundle(context: Context): File {
    val target = File(context.filesDir, "edgepack")
    if (File(target, "manifest.json").exists()) return target
    val partial = File(context.filesDir, "edgepack.partial").apply { deleteRecursively() }
    fun copy(asset: String, to: File) {
        val children = context.assets.list(asset).orEmpty()
        if (children.isEmpty()) {
            to.parentFile?.mkdirs()
            context.assets.open(asset).use { input -> to.outputStream().use { input.copyTo(it) } }
        } else {
            children.forEach { copy("$asset/$it", File(to, it)) }
        }
    }
    copy("edgepack", partial)
    target.deleteRecursively()
    check(partial.renameTo(target)) { "cannot move $partial to $target" }
    return target
}
