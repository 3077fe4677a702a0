// swift-tools-version:5.9
// The edgepack iOS sample: reads a bundle's manifest.json, runs the CoreML .mlpackage and the
// ExecuTorch .pte, and (EdgepackSampleTests) replays the bundle's smoke cases on the iOS Simulator.
// The ExecuTorch branch must be the release line that exported the .pte: `edgepack export` prints
// it (edgepack/packaging/integration.py); tests/e2e/test_sample_apps.py checks this file against it.
import PackageDescription

// ExecuTorch's kernels and backends register themselves in static initializers: keep them all.
let keepRegistrations: [LinkerSetting] = [.unsafeFlags(["-Xlinker", "-all_load"])]

let package = Package(
    name: "EdgepackSample",
    // iOS 18: CoreML states hold the LM's KV cache. Written as strings: .v18 / .v15 exist only
    // from PackageDescription 6.0, and this manifest is tools 5.9.
    platforms: [.iOS("18.0"), .macOS("15.0")],
    products: [.library(name: "EdgepackSample", targets: ["EdgepackSample"])],
    dependencies: [
        .package(url: "https://github.com/pytorch/executorch.git", branch: "swiftpm-1.5.0"),
    ],
    targets: [
        .target(
            name: "EdgepackSample",
            dependencies: [
                .product(name: "executorch", package: "executorch"),
                .product(name: "executorch_llm", package: "executorch"),
                .product(name: "backend_xnnpack", package: "executorch"),
                .product(name: "kernels_optimized", package: "executorch"),
                .product(name: "kernels_quantized", package: "executorch"),
                .product(name: "kernels_llm", package: "executorch"),
            ],
            linkerSettings: keepRegistrations
        ),
        .testTarget(name: "EdgepackSampleTests", dependencies: ["EdgepackSample"], linkerSettings: keepRegistrations),
    ]
)
