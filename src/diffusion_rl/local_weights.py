"""Pretrained weights that come from a local folder the user gives (Stable Diffusion, CLIP).

Nothing is downloaded, here or on a cluster's compute nodes: a component that reads such a
folder takes it as ``weights_dir`` (set from a ``paths.*`` key), and a missing folder is one
line naming that key — from the config check before a run starts (validation.check_paths),
and again here should the component be built another way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

__all__ = ["check_weights_dir", "quiet_loading"]


def check_weights_dir(folder, key: str, what: str, parts: Sequence[str] = ()) -> Path:
    """``folder`` as a Path, or one ``FileNotFoundError`` line naming the config ``key``."""
    if folder is None or str(folder) in ("", "None", "null"):
        raise FileNotFoundError(f"{key} is not set: give the local folder of {what} ({key}=/path/to/it); "
                                "nothing is downloaded")
    folder = Path(str(folder)).expanduser()
    missing = [p for p in parts if not (folder / p).exists()]
    if not folder.is_dir() or missing:
        found = "no such folder" if not folder.is_dir() else f"it lacks {', '.join(missing)}"
        raise FileNotFoundError(f"{key}={folder}: {found} (expected {what})")
    return folder


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading report and progress bars off while a component loads its weights
    (loading a whole CLIP folder for its vision tower lists every text weight as unused: that
    is expected, not news), restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
