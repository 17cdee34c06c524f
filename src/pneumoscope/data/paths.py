"""Where pneumoscope keeps files of its own. Imports nothing heavy: the downloader uses it without torch."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$PNEUMOSCOPE_CACHE, else the user's cache folder (platformdirs): features, decoded images, downloads."""
    env = os.environ.get("PNEUMOSCOPE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("pneumoscope"))
