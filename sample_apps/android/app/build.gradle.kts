plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

// The bundle the app ships in its assets: ./gradlew assembleDebug -Pedgepack.bundle=/path/to/dist/<name>
// (default: the repository's `make demo` output). The instrumented smoke test reads a bundle that
// smoke/run_android.sh pushes instead, so one test APK checks any bundle.
val edgepackBundle = providers.gradleProperty("edgepack.bundle").orElse("../../../dist/demo-llama")
val bundleAssets = layout.buildDirectory.dir("edgepack-assets")
val copyBundle by tasks.registering(Sync::class) {
    // The archive repeats the bundle; the CoreML package runs on Apple platforms only.
    from(edgepackBundle) { exclude("*.edgepack.zip", "coreml/**") }
    into(bundleAssets.map { it.dir("edgepack") })
}

android {
    namespace = "com.edgepack.sample"
    compileSdk = 35
    defaultConfig {
        applicationId = "com.edgepack.sample"
        // ExecuTorch's AAR declares 23 and LiteRT 2.3's 24; 26 keeps the sample on one API level
        // for both runtimes and for the x86_64 emulator images CI uses.
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "1.0"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        // ExecuTorch's AAR ships arm64-v8a and x86_64 (the emulator's ABI)
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    sourceSets["main"].assets.srcDir(bundleAssets)
    androidResources { noCompress += listOf("pte", "tflite") } // memory-mapped by the runtimes
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

// Kotlin 2.x: compilerOptions replaces the deprecated kotlinOptions block.
kotlin { compilerOptions { jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_17) } }

tasks.named("preBuild") { dependsOn(copyBundle) }

dependencies {
    implementation(libs.executorch.android)
    implementation(libs.litert)
    androidTestImplementation(libs.androidx.test.runner)
    androidTestImplementation(libs.androidx.test.junit)
}
