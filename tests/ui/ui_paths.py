"""Paths shared by the browser tests (a module of its own so conftest.py and test_lab.py both import it)."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
NOTEBOOK_DIR = Path(os.environ.get("VQLAB_UI_NOTEBOOKS", REPO / "notebooks")).resolve()
