import Foundation

/// The part of an edgepack bundle's manifest.json the app needs. Every key read here is listed in
/// sample_apps/bundle_keys.json, which a test checks against packaging/manifest.schema.json and a
/// real export, so a manifest change that breaks the app fails in edgepack's own test suite.
public struct BundleManifest {
    public struct Method {
        public let name: String
        public let inputs: [String]
        public let outputs: [String]
    }

    public struct Artifact {
        public let backend: String
        public let path: String
        public let platforms: [String]
        public let runtimeName: String
        public let runtimeVersion: String
        public let methods: [Method]
    }

    public let directory: URL
    public let name: String
    public let task: String
    /// tokenizer.json, as ExecuTorch's TextRunner loads it; nil for a model without a tokenizer.
    public let tokenizer: URL?
    public let eosIds: [Int]
    /// BOS tokens the app prepends: the runners' tokenizers do not add them (Config.bosCount).
    public let numBos: Int
    public let maxSeqLen: Int
    public let artifacts: [Artifact]

    public init(directory: URL) throws {
        let data = try Data(contentsOf: directory.appendingPathComponent("manifest.json"))
        guard let json = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw SampleError("\(directory.path)/manifest.json is not a JSON object")
        }
        self.directory = directory
        name = json["name"] as? String ?? ""
        task = (json["model"] as? [String: Any])?["task"] as? String ?? ""
        let tokenizerFacts = json["tokenizer"] as? [String: Any]
        tokenizer = (tokenizerFacts?["files"] as? [[String: Any]])?
            .compactMap { $0["path"] as? String }.first { $0.hasSuffix("tokenizer.json") }
            .map { directory.appendingPathComponent($0) }
        eosIds = tokenizerFacts?["eos_ids"] as? [Int] ?? []
        let generation = json["generation"] as? [String: Any]
        numBos = generation?["num_bos"] as? Int ?? 0
        maxSeqLen = generation?["max_seq_len"] as? Int ?? 0
        artifacts = (json["artifacts"] as? [[String: Any]] ?? []).map { a in
            let runtime = a["runtime"] as? [String: Any] ?? [:]
            let names = { (specs: Any?) in (specs as? [[String: Any]] ?? []).compactMap { $0["name"] as? String } }
            return Artifact(
                backend: a["backend"] as? String ?? "",
                path: a["path"] as? String ?? "",
                platforms: a["platforms"] as? [String] ?? [],
                runtimeName: runtime["name"] as? String ?? "",
                runtimeVersion: runtime["version"] as? String ?? "",
                methods: (a["methods"] as? [[String: Any]] ?? []).map {
                    Method(name: $0["name"] as? String ?? "", inputs: names($0["inputs"]), outputs: names($0["outputs"]))
                }
            )
        }
    }

    public func artifact(_ backend: String) -> Artifact? { artifacts.first { $0.backend == backend } }

    public func url(of artifact: Artifact) -> URL { directory.appendingPathComponent(artifact.path) }
}

public struct SampleError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
