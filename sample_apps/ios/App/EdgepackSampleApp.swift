// The app shell: add this file to an iOS App target in Xcode, add the local package
// (sample_apps/ios) to it, and add the bundle folder (dist/<name>, without the .zip) to the
// target's resources as a folder reference named "edgepack".
import EdgepackSample
import SwiftUI

@main
struct EdgepackSampleApp: App {
    var body: some Scene {
        WindowGroup {
            ChatView(bundle: Bundle.main.url(forResource: "edgepack", withExtension: nil)
                ?? Bundle.main.bundleURL.appendingPathComponent("edgepack"))
        }
    }
}
