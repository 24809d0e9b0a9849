"""Where the repository-level resources are: bundled model packages and sample scans.

``Resources/`` sits one level above the package, in a source checkout and in the Slicer
extension's install tree alike (the extension copies the engine and ``Resources/`` side by side).
"""

from __future__ import annotations

import os
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUNDLED_MODELS_DIR = RESOURCES / "Models"
SAMPLE_DATA = RESOURCES / "SampleData"
#: The 8-echo MESE knee `kneeseg demo` runs on.
DEMO_SCAN = SAMPLE_DATA / "mese_t2_knee.nrrd"

#: Environment variable naming KneeSeg's per-user folder (model cache, downloads).
HOME_VARIABLE = "KNEESEG_HOME"


def kneeseg_home() -> Path:
    """KneeSeg's per-user folder: ``$KNEESEG_HOME``, else ``~/.kneeseg``."""
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".kneeseg").expanduser()
