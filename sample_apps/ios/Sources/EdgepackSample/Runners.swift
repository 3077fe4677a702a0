import CoreML
import ExecuTorch
import Foundation

/// An input of a golden case: values as doubles, cast to the dtype the artifact takes.
public struct InputTensor {
    public let name: String
    public let dtype: String
    public let shape: [Int]
    public let data: [Double]

    // A memberwise initializer is internal: the tests (another module) need a public one.
    public init(name: String, dtype: String, shape: [Int], data: [Double]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }
}

public struct OutputTensor {
    public let shape: [Int]
    public let data: [Float]
}

/// An artifact behind edgepack's two calling conventions. LMs: forward(tokens [1, T], input_pos [1])
/// -> the logits of the last position (prefill once with the prompt, then one token per call), the
/// KV cache carried by the runtime. Other models: one call of `method`, outputs in order.
public protocol ArtifactRunner {
    func forward(tokens: [Int64], startPos: Int64) throws -> [Float]
    func run(method: String, inputs: [InputTensor]) throws -> [OutputTensor]
}

/// ExecuTorch's Module: the .pte holds the KV cache and takes the convention as it is.
public final class ExecuTorchRunner: ArtifactRunner {
    private let module: Module

    public init(url: URL) throws {
        module = Module(filePath: url.path)
        try module.load("forward")
    }

    public func forward(tokens: [Int64], startPos: Int64) throws -> [Float] {
        let outputs: [Value] = try module.forward([Tensor<Int64>(tokens, shape: [1, tokens.count]),
                                                  Tensor<Int64>([startPos], shape: [1])])
        guard let logits: Tensor<Float> = outputs.first?.tensor(), let vocab = logits.shape.last else {
            throw SampleError("forward returned no float32 logits")
        }
        return Array(logits.scalars().suffix(vocab))
    }

    public func run(method: String, inputs: [InputTensor]) throws -> [OutputTensor] {
        let values: [ValueConvertible] = inputs.map { x in
            x.dtype == "float32" ? Tensor<Float>(x.data.map { Float($0) }, shape: x.shape)
                                 : Tensor<Int64>(x.data.map { Int64($0) }, shape: x.shape)
        }
        let outputs: [Value] = try module.execute(method, values)
        return try outputs.map { value in
            guard let t: Tensor<Float> = value.tensor() else { throw SampleError("\(method) returned a non-float32 output") }
            return OutputTensor(shape: t.shape, data: t.scalars())
        }
    }
}

/// Core ML on the CPU (compute units .cpuOnly, the numerics the smoke test compares), compiled from
/// the .mlpackage at load. The KV cache of an LM is Core ML state (iOS 18), kept between calls.
public final class CoreMLRunner: ArtifactRunner {
    private let model: MLModel
    private let method: BundleManifest.Method
    private let state: MLState?

    public init(url: URL, method: BundleManifest.Method) throws {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = .cpuOnly
        model = try MLModel(contentsOf: try MLModel.compileModel(at: url), configuration: configuration)
        self.method = method
        state = model.modelDescription.stateDescriptionsByName.isEmpty ? nil : model.makeState()
    }

    private func predict(_ inputs: [String: MLMultiArray]) throws -> MLFeatureProvider {
        let provider = try MLDictionaryFeatureProvider(dictionary: inputs)
        if let state { return try model.prediction(from: provider, using: state) }
        return try model.prediction(from: provider)
    }

    public func forward(tokens: [Int64], startPos: Int64) throws -> [Float] {
        // Core ML has no int64: the program takes int32 (the manifest records the dtypes).
        let out = try predict([method.inputs[0]: try array(tokens.map { Double($0) }, shape: [1, tokens.count], type: .int32),
                               method.inputs[1]: try array([Double(startPos)], shape: [1], type: .int32)])
        let logits = try floats(out, method.outputs[0])
        return Array(logits.data.suffix(logits.shape.last ?? 0))
    }

    public func run(method _: String, inputs: [InputTensor]) throws -> [OutputTensor] {
        let out = try predict(Dictionary(uniqueKeysWithValues: try inputs.map {
            ($0.name, try array($0.data, shape: $0.shape, type: $0.dtype == "float32" ? .float32 : .int32))
        }))
        return try method.outputs.map { try floats(out, $0) }
    }

    private func array(_ values: [Double], shape: [Int], type: MLMultiArrayDataType) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: type)
        for (i, v) in values.enumerated() { a[i] = NSNumber(value: v) }
        return a
    }

    private func floats(_ out: MLFeatureProvider, _ name: String) throws -> OutputTensor {
        guard let a = out.featureValue(for: name)?.multiArrayValue else { throw SampleError("no output \(name)") }
        // Converted as a shaped array: its scalars follow the shape whatever the strides, and an
        // fp16 output (CoreML's default precision) becomes Float.
        return OutputTensor(shape: a.shape.map(\.intValue), data: MLShapedArray<Float>(converting: a).scalars)
    }
}

/// The runner for an artifact the iOS sample app links a runtime for, or nil.
public func openRunner(_ manifest: BundleManifest, _ artifact: BundleManifest.Artifact, method: String) throws -> ArtifactRunner? {
    switch artifact.backend {
    case "executorch": return try ExecuTorchRunner(url: manifest.url(of: artifact))
    case "coreml":
        guard let spec = artifact.methods.first(where: { $0.name == method }) else {
            throw SampleError("coreml artifact has no method \(method)")
        }
        return try CoreMLRunner(url: manifest.url(of: artifact), method: spec)
    default: return nil
    }
}
