import ExecuTorchLLM
import SwiftUI

/// A minimal chat over a bundle's .pte through ExecuTorch's own LLM runner (TextRunner: its
/// tokenizer, KV cache and stop tokens from the .pte's metadata), greedy, with the manifest's BOS count.
public struct ChatView: View {
    private let manifest: BundleManifest?
    private let problem: String?
    @State private var prompt = ""
    @State private var transcript = ""
    @State private var busy = false
    // Made on the first send and reused: it loads (maps) the .pte and tokenizer once.
    @State private var runner: TextRunner?

    public init(bundle: URL) {
        do {
            manifest = try BundleManifest(directory: bundle)
            problem = nil
        } catch {
            manifest = nil
            problem = "cannot read \(bundle.path)/manifest.json: \(error)"
        }
    }

    public var body: some View {
        VStack(alignment: .leading) {
            Text(header).font(.caption)
            ScrollView { Text(transcript).frame(maxWidth: .infinity, alignment: .leading) }
            HStack {
                TextField("Prompt", text: $prompt)
                Button("Send", action: send).disabled(busy || runnerPaths == nil)
            }
        }.padding()
    }

    private var header: String {
        guard let manifest else { return problem ?? "" }
        let runtimes = manifest.artifacts.filter { $0.platforms.contains("ios") }
            .map { "\($0.backend): \($0.path) on \($0.runtimeName) \($0.runtimeVersion)" }
        return (["\(manifest.name) (\(manifest.task)), stops at token ids \(manifest.eosIds)"] + runtimes)
            .joined(separator: "\n")
    }

    private var runnerPaths: (pte: String, tokenizer: String)? {
        guard let manifest, manifest.task == "causal-lm", let pte = manifest.artifact("executorch"),
              let tokenizer = manifest.tokenizer else { return nil }
        return (manifest.url(of: pte).path, tokenizer.path)
    }

    private func send() {
        guard let manifest, let paths = runnerPaths else { return }
        let text = prompt
        transcript += "\n> \(text)\n"
        busy = true
        let runner = self.runner ?? TextRunner(modelPath: paths.pte, tokenizerPath: paths.tokenizer)
        self.runner = runner
        Task.detached {
            do {
                try runner.generate(text, Config {
                    $0.temperature = 0
                    $0.sequenceLength = manifest.maxSeqLen
                    $0.bosCount = manifest.numBos
                }) { token in Task { @MainActor in transcript += token } }
            } catch {
                await MainActor.run { transcript += "\n[error: \(error)]" }
            }
            await MainActor.run { busy = false }
        }
    }
}
