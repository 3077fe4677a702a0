"""The Gradle and Swift Package Manager lines an app needs to run a bundle's artifacts, gathered
from each artifact's backend (its app_lines, from the runtime release line the manifest records)."""

from __future__ import annotations

from edgepack.exporters.registry import BACKENDS


def integration_snippets(manifest: dict) -> dict:
    """{"gradle": [lines], "swiftpm": [lines], "notes": [...]} for the bundle's artifacts."""
    gradle, swiftpm, notes = [], [], []
    for artifact in manifest["artifacts"]:
        lines = BACKENDS[artifact["backend"]].app_lines_for(artifact, manifest["model"]["task"])
        gradle += lines.gradle
        swiftpm += lines.swiftpm
        notes += lines.notes
    return {"gradle": gradle, "swiftpm": swiftpm, "notes": notes}
