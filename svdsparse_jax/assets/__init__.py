"""Where the bundled files live: the default model (an HF-format directory with its card) and the corpus'
calibration and held-out token arrays. Every path to a bundled file is built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent
BUNDLED_MODEL = ASSETS / "default_model"
CORPUS = ASSETS / "corpus"
CORPUS_SPLITS = ("calib", "heldout")


def corpus_split(name: str) -> np.ndarray:
    """The bundled corpus' token ids of one split ('calib' or 'heldout'), int array [n]."""
    if name not in CORPUS_SPLITS:
        raise ValueError(f"corpus split {name!r}: expected one of {CORPUS_SPLITS}")
    return np.load(CORPUS / f"{name}.npy")


def is_bundled_model(path: str | Path) -> bool:
    return Path(path).resolve() == BUNDLED_MODEL
