package com.edgepack.sample

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter

/** An input of a golden case: values as doubles, cast to the dtype the artifact takes. */
class InputTensor(val name: String, val dtype: String, val shape: IntArray, val data: DoubleArray)

/** An output: its shape and values. */
class OutputTensor(val shape: IntArray, val data: FloatArray)

/**
 * An artifact behind edgepack's two calling conventions. LMs: forward(tokens [1, T], input_pos [1])
 * -> the logits of the last position (prefill once with the prompt, then one token per call), the
 * KV cache carried by the runner. Other models: one call of `method`, outputs in order.
 */
interface ArtifactRunner : AutoCloseable {
    fun forward(tokens: LongArray, startPos: Long): FloatArray

    fun run(method: String, inputs: List<InputTensor>): List<OutputTensor>
}

/** ExecuTorch's Module: the .pte holds the KV cache and takes the convention as it is. */
class ExecuTorchRunner(file: File) : ArtifactRunner {
    private val module = Module.load(file.absolutePath)

    override fun forward(tokens: LongArray, startPos: Long): FloatArray {
        val out = module.forward(
            EValue.from(Tensor.fromBlob(tokens, longArrayOf(1, tokens.size.toLong()))),
            EValue.from(Tensor.fromBlob(longArrayOf(startPos), longArrayOf(1))),
        )[0].toTensor()
        val logits = out.dataAsFloatArray
        val vocab = out.shape().last().toInt()
        return logits.copyOfRange(logits.size - vocab, logits.size)
    }

    override fun run(method: String, inputs: List<InputTensor>): List<OutputTensor> {
        val values = inputs.map { x ->
            val shape = LongArray(x.shape.size) { x.shape[it].toLong() }
            EValue.from(
                if (x.dtype == "float32") Tensor.fromBlob(FloatArray(x.data.size) { x.data[it].toFloat() }, shape)
                else Tensor.fromBlob(LongArray(x.data.size) { x.data[it].toLong() }, shape)
            )
        }
        return module.execute(method, *values.toTypedArray()).map { v ->
            val t = v.toTensor()
            OutputTensor(IntArray(t.shape().size) { t.shape()[it].toInt() }, t.dataAsFloatArray)
        }
    }

    override fun close() = module.destroy()
}

/**
 * LiteRT's Interpreter with the .tflite's signatures, as edgepack's host adapter drives them
 * (packaging/tflite_runtime.py): an LM has prefill_<N> and decode signatures with the KV cache as
 * explicit inputs and outputs; the prompt but its last token goes through prefill in chunks of N
 * (padded), the last token through decode, whose logits are the answer. Others: serving_default,
 * inputs padded to the length they were exported at and outputs cut back.
 */
class LiteRtRunner(file: File, private val outputNames: List<String>) : ArtifactRunner {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(2))
    private val prefill = interpreter.signatureKeys.filter { it.startsWith("prefill_") }
        .associateBy { it.removePrefix("prefill_").toInt() }
    private var cache: Map<String, ByteBuffer> =
        if ("decode" !in interpreter.signatureKeys) emptyMap()
        else interpreter.getSignatureInputs("decode").filter { it.startsWith("kv_cache_") }
            .associateWith { direct(interpreter.getInputTensorFromSignature(it, "decode").numBytes()) }
    private val maxSeqLen =
        cache.keys.firstOrNull()?.let { interpreter.getInputTensorFromSignature(it, "decode").shape()[2] } ?: 0

    private fun call(signature: String, tokens: IntArray, positions: IntArray): Map<String, ByteBuffer> {
        val inputs = HashMap<String, Any>(cache.mapValues { it.value.also { b -> b.rewind() } })
        inputs["tokens"] = arrayOf(tokens)
        inputs["input_pos"] = positions
        val outputs = interpreter.getSignatureOutputs(signature)
            .associateWith { direct(interpreter.getOutputTensorFromSignature(it, signature).numBytes()) }
        interpreter.runSignature(inputs, outputs, signature)
        outputs.values.forEach { it.rewind() }
        cache = cache.keys.associateWith { outputs.getValue(it) }
        return outputs
    }

    override fun forward(tokens: LongArray, startPos: Long): FloatArray {
        var done = 0
        while (done < tokens.size - 1) {
            val left = tokens.size - 1 - done
            val length = prefill.keys.filter { it >= left }.minOrNull() ?: prefill.keys.max()
            val pos = startPos.toInt() + done
            // DYNAMIC_UPDATE_SLICE clamps a write past the cache onto real entries: refuse instead.
            check(pos + length <= maxSeqLen) { "prefill_$length at position $pos runs past the KV cache ($maxSeqLen)" }
            val chunk = IntArray(length) { if (it < left) tokens[done + it].toInt() else 0 }
            call(prefill.getValue(length), chunk, IntArray(length) { pos + it })
            done += minOf(left, length)
        }
        val last = (startPos + tokens.size - 1).toInt()
        return floats(call("decode", intArrayOf(tokens.last().toInt()), intArrayOf(last)).getValue("logits"))
    }

    /** `method` is the captured model's; the .tflite exposes it as its serving_default signature. */
    override fun run(method: String, inputs: List<InputTensor>): List<OutputTensor> {
        val signature = SERVING
        val real = HashMap<Int, Int>() // padded length -> the case's length
        val buffers = inputs.associate { x ->
            val tensor = interpreter.getInputTensorFromSignature(x.name, signature)
            val want = tensor.shape()
            x.shape.zip(want.toList()).filter { (have, w) -> have != w }.forEach { (have, w) -> real[w] = have }
            x.name to fill(tensor.dataType(), tensor.numBytes(), pad(x.data, x.shape, want))
        }
        val outputs = outputNames.associateWith { direct(interpreter.getOutputTensorFromSignature(it, signature).numBytes()) }
        interpreter.runSignature(buffers, outputs, signature)
        return outputNames.map { n ->
            val shape = interpreter.getOutputTensorFromSignature(n, signature).shape()
            cut(floats(outputs.getValue(n)), shape, real)
        }
    }

    override fun close() = interpreter.close()

    companion object {
        const val SERVING = "serving_default"
    }
}

private fun direct(bytes: Int): ByteBuffer = ByteBuffer.allocateDirect(bytes).order(ByteOrder.nativeOrder())

private fun floats(buffer: ByteBuffer): FloatArray {
    buffer.rewind()
    return FloatArray(buffer.remaining() / 4).also { buffer.asFloatBuffer().get(it) }
}

private fun fill(type: DataType, bytes: Int, values: DoubleArray): ByteBuffer = direct(bytes).apply {
    for (v in values) when (type) {
        DataType.FLOAT32 -> putFloat(v.toFloat())
        DataType.INT64 -> putLong(v.toLong())
        DataType.INT32 -> putInt(v.toInt())
        else -> error("edgepack sample: input type $type is not handled")
    }
    rewind()
}

/** Zero-pads a row-major tensor from `shape` to `want` (token 0, attention mask 0). */
private fun pad(data: DoubleArray, shape: IntArray, want: IntArray): DoubleArray {
    val out = DoubleArray(want.fold(1) { a, b -> a * b })
    for (i in data.indices) out[offsetIn(want, shape, i)] = data[i]
    return out
}

/** The flat offset, in a row-major tensor of shape `into`, of the element with the same
 *  multi-index as the i-th element of a row-major tensor of shape `from`. */
private fun offsetIn(into: IntArray, from: IntArray, i: Int): Int {
    var rest = i
    var offset = 0
    var stride = 1
    for (d in from.indices.reversed()) {
        offset += (rest % from[d]) * stride
        rest /= from[d]
        stride *= into[d]
    }
    return offset
}

/** Cuts every dimension whose size is a padded length back to the case's length. */
private fun cut(data: FloatArray, shape: IntArray, real: Map<Int, Int>): OutputTensor {
    val kept = IntArray(shape.size) { real[shape[it]] ?: shape[it] }
    val out = FloatArray(kept.fold(1) { a, b -> a * b })
    for (i in out.indices) out[i] = data[offsetIn(shape, kept, i)]
    return OutputTensor(kept, out)
}

/** The runner for an artifact the Android sample app links a runtime for, or null. */
fun openRunner(manifest: BundleManifest, artifact: BundleManifest.Artifact): ArtifactRunner? =
    when (artifact.backend) {
        "executorch" -> ExecuTorchRunner(manifest.file(artifact))
        "tflite" -> LiteRtRunner(
            manifest.file(artifact),
            artifact.methods.firstOrNull { it.name == LiteRtRunner.SERVING }?.outputs ?: emptyList(),
        )
        else -> null
    }
