"""Where the repository's pipeline code lives.

The KFP components (``components/hescape_components``) and the pipelines
(``pipelines/hescape_pipelines``) sit beside ``src/`` in the repository; they are not part of the
installed ``hescape`` package (component bodies import only ``hescape`` at run time, so the images
need only the package). The CLI and ``python -m hescape.main_job`` find them from the working
directory (or ``$HESCAPE_REPO``), else from the editable install's ``src/`` layout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hescape.errors import ConfigError

ENV_REPO = "HESCAPE_REPO"
MARKERS = ("components/hescape_components/__init__.py", "pipelines/hescape_pipelines/__init__.py")


def _is_root(path: Path) -> bool:
    return all((path / marker).is_file() for marker in MARKERS)


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root holding ``components/`` and ``pipelines/``."""
    candidates = []
    if os.environ.get(ENV_REPO):
        candidates.append(Path(os.environ[ENV_REPO]))
    here = Path(start or os.getcwd()).resolve()
    candidates += [here, *here.parents]
    candidates.append(Path(__file__).resolve().parents[3])  # <root>/src/hescape/orchestration/project.py
    for candidate in candidates:
        if _is_root(candidate):
            return candidate
    raise ConfigError("components/hescape_components and pipelines/hescape_pipelines not found: run from the "
                      f"repository checkout (or set {ENV_REPO})")


def add_pipeline_paths(root: str | os.PathLike | None = None) -> Path:
    """Make ``hescape_components`` and ``hescape_pipelines`` importable; returns the repository root."""
    root = Path(root) if root is not None else repo_root()
    for sub in ("pipelines", "components"):
        path = str(root / sub)
        if path not in sys.path:
            sys.path.insert(0, path)
    return root
