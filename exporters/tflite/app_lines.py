"""The Gradle line an app links to run a .tflite: the LiteRT release line that converted it
(artifacts[].runtime.version, recorded at export). A line edgepack has not verified gets a note
saying so, never a guessed coordinate."""

from __future__ import annotations

from edgepack.exporters.backend import AppLines, release_line, unverified_release

# Release line -> Maven coordinate. com.google.ai.edge.litert:litert:2.3.0 (Google Maven): the
# LiteRT release of ai-edge-litert 2.3.0; Google's LiteRT GPU guide and public apps pin it. Its
# Interpreter API (CPU) is what the sample app's smoke test drives, as the Python interpreter does
# on the host.
RELEASES = {"2.3": "com.google.ai.edge.litert:litert:2.3.0"}


def app_lines(artifact: dict, task: str) -> AppLines:
    runtime = artifact["runtime"]
    gradle = RELEASES.get(release_line(runtime["version"]))
    if gradle is None:
        return unverified_release(artifact)
    notes = (f"{artifact['backend']} on iOS: the sample app does not link {runtime['name']}; no SwiftPM line",)
    return AppLines(gradle=(f'implementation("{gradle}")',) if "android" in artifact["platforms"] else (),
                    notes=notes if "ios" in artifact["platforms"] else ())
