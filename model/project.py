"""Facts every part of the project shares, standard library only (no torch): the data side, the
app and an exported Hugging Face Space import them without pulling in the model.

``PROJECT_ROOT``: the repository root, or in a Space the folder that holds ``model/``. Config
paths, run folders (:data:`RUNS_DIR`), ``configs/`` and ``data_beton/`` are relative to it.
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = 'runs'  # run folders: <root>/runs/<name>/ (training's output.dir default)
DATA_DIR = 'data_beton'  # converted datasets: <root>/data_beton/<name>/ (write_datasets.py's default)
