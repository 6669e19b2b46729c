"""Versions of what computed an artefact, saved with it so a cache says how it was made."""
from __future__ import annotations

import platform
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(*extra: str) -> dict[str, str]:
    names = ("clipspeech", "torch", "torchaudio", "numpy", *extra)
    return {"python": platform.python_version(), **{name: _version(name) for name in names}}
