"""The trained demo model that ships inside the package (configs/demo_model/, built by tools/train_demo.py):
what `builtin:demo` means. Read in place, checked against its manifest first, so a damaged install is one clear
error instead of a model that quietly says nonsense."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moerun.backends.errors import CheckpointError
from moerun.runtime.demo import FILES as _RELEASE_FILES, matches_manifest

VERSION = "trained-demo-v1"
# The random demo's release-layout files, plus the record of how this one was trained.
FILES = _RELEASE_FILES + ("training.json",)


def shipped_folder() -> Path:
    return Path(str(resources.files("moerun.configs") / "demo_model"))


def trained_demo_folder() -> Path:
    folder = shipped_folder()
    if not matches_manifest(folder, VERSION, FILES):
        raise CheckpointError(f"{folder}: the shipped demo model is missing or damaged (its files do not match "
                              f"moerun-demo.json); reinstall moerun")
    return folder
