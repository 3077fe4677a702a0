"""What an app needs to run a .mlpackage: nothing to link, an iOS deployment target."""

from __future__ import annotations

from edgepack.exporters.backend import AppLines


def app_lines(artifact: dict, task: str) -> AppLines:
    return AppLines(notes=(f"coreml: Core ML ships with iOS; the .mlpackage needs "
                           f"{artifact['runtime']['deployment_target']} or later (Package.swift platforms) and no package",))
