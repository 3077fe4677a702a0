"""Every manifest and cases.json key the sample apps read is read by their code."""

from __future__ import annotations

from tests.conftest import APP_KEYS as KEYS
from tests.conftest import SAMPLE_APPS as APPS


def _sources(suffix: str) -> str:
    return "\n".join(p.read_text() for p in APPS.rglob(f"*.{suffix}"))


def test_every_key_is_read_by_the_apps_code():
    kotlin, swift = _sources("kt"), _sources("swift")
    for group in KEYS.values():
        for key in group if isinstance(group, list) else []:
            literal = f'"{[p for p in key.split(".") if p != "*"][-1].removesuffix("[]")}"'
            assert literal in kotlin or literal in swift, f"no app reads {key}"

