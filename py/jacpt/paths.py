"""Where the kit's files live. Everything derives from the checkout's root.

JACPT_DATA_DIR and JACPT_ASSETS_DIR move the two big output trees (tests point
them at a temp dir; a workstation may point them at a larger disk).
"""

from __future__ import annotations

import os
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = KIT_ROOT / "configs"
BIN_DIR = KIT_ROOT / "bin"
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def data_dir() -> Path:
    return Path(os.environ.get("JACPT_DATA_DIR") or KIT_ROOT / "data").resolve()


def assets_dir() -> Path:
    return Path(os.environ.get("JACPT_ASSETS_DIR") or KIT_ROOT / "assets").resolve()


def resolve(path: str | Path) -> Path:
    """A path from a config: absolute as is, relative to the kit root otherwise."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else KIT_ROOT / p).resolve()
