import EdgepackSample
import Foundation

/// The bundle's smoke/cases.json (written by edgepack's packaging/device_smoke.py): the golden
/// inputs and each backend's expected greedy tokens or output tensors, and the tolerance.
struct SmokeCases {
    struct Case {
        let name: String
        let kind: String
        let method: String
        let steps: Int
        let inputs: [InputTensor]
        let expected: [String: [String: Any]] // backend -> {"tokens": [...]} or {output name: {"shape", "data"}}
    }

    struct Verdict {
        let metrics: [String: String]
        let failures: [String]
    }

    let minCosine: Double
    let maxAbs: Double?
    let cases: [Case]

    init(url: URL) throws {
        guard let json = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any],
              json["format"] as? Int == 1, let tolerance = json["tolerance"] as? [String: Any] else {
            throw SampleError("\(url.path): not a cases.json of format 1")
        }
        minCosine = tolerance["min_cosine"] as? Double ?? 1
        maxAbs = tolerance["max_abs"] as? Double
        cases = (json["cases"] as? [[String: Any]] ?? []).map { c in
            Case(name: c["name"] as? String ?? "", kind: c["kind"] as? String ?? "",
                 method: c["method"] as? String ?? "", steps: c["steps"] as? Int ?? 0,
                 inputs: (c["inputs"] as? [[String: Any]] ?? []).map {
                     InputTensor(name: $0["name"] as? String ?? "", dtype: $0["dtype"] as? String ?? "",
                                 shape: $0["shape"] as? [Int] ?? [], data: ($0["data"] as? [NSNumber] ?? []).map(\.doubleValue))
                 },
                 expected: c["expected"] as? [String: [String: Any]] ?? [:])
        }
    }

    func judge(_ runner: ArtifactRunner, backend: String, case c: Case) throws -> Verdict {
        guard let expected = c.expected[backend] else { throw SampleError("cases.json has no \(backend) outputs for \(c.name)") }
        return c.kind == "greedy" ? try greedy(runner, c, expected) : try tensors(runner, c, expected)
    }

    /// Prefill the prompt, then feed back the argmax one token at a time (edgepack's decode_greedy).
    private func greedy(_ runner: ArtifactRunner, _ c: Case, _ expected: [String: Any]) throws -> Verdict {
        let want = (expected["tokens"] as? [NSNumber] ?? []).map(\.int64Value)
        var input = c.inputs[0].data.map { Int64($0) }
        var pos: Int64 = 0
        var got: [Int64] = []
        for _ in 0..<c.steps {
            let logits = try runner.forward(tokens: input, startPos: pos)
            let next = Int64(logits.indices.max { logits[$0] < logits[$1] } ?? 0)
            got.append(next)
            pos += Int64(input.count)
            input = [next]
        }
        let mismatch = (0..<max(got.count, want.count)).first { $0 >= got.count || $0 >= want.count || got[$0] != want[$0] }
        let failures = mismatch.map { step in
            ["greedy tokens differ from step \(step): expected \(want.count > step ? "\(want[step])" : "none"), got \(got.count > step ? "\(got[step])" : "none")"]
        } ?? []
        return Verdict(metrics: ["tokens_match": mismatch == nil ? "true" : "false",
                                 "first_token_mismatch": mismatch.map(String.init) ?? ""], failures: failures)
    }

    /// Every output row by row (the last dimension), as edgepack's compare does.
    private func tensors(_ runner: ArtifactRunner, _ c: Case, _ expected: [String: Any]) throws -> Verdict {
        var minCos = 1.0, maxDiff = 0.0
        var failures: [String] = []
        for (i, actual) in try runner.run(method: c.method, inputs: c.inputs).enumerated() {
            let ref = expected["output_\(i)"] as? [String: Any] ?? [:]
            let shape = ref["shape"] as? [Int] ?? []
            guard shape == actual.shape else {
                failures.append("shape mismatch: output_\(i) expected \(shape), got \(actual.shape)")
                continue
            }
            let want = (ref["data"] as? [NSNumber] ?? []).map(\.doubleValue)
            let row = max(shape.last ?? 1, 1)
            for start in stride(from: 0, to: want.count, by: row) {
                var dot = 0.0, a2 = 0.0, b2 = 0.0
                for j in start..<start + row {
                    let a = want[j], b = Double(actual.data[j])
                    dot += a * b; a2 += a * a; b2 += b * b
                    maxDiff = max(maxDiff, abs(a - b))
                }
                minCos = min(minCos, a2 * b2 > 0 ? dot / (a2 * b2).squareRoot() : (a2 == b2 ? 1 : 0))
            }
        }
        if minCos < minCosine { failures.append("cosine \(minCos) < \(minCosine)") }
        if let maxAbs, maxDiff > maxAbs { failures.append("max abs diff \(maxDiff) > \(maxAbs)") }
        return Verdict(metrics: ["min_cosine": String(minCos), "max_abs_diff": String(maxDiff)], failures: failures)
    }
}
