"""KFP v2 components of the HESCAPE pipeline: one per step, thin wrappers around the ``hescape`` library.

=================  ========================================================  =========================
component          what it runs                                              outputs
=================  ========================================================  =========================
curate             ``dvc pull`` / ``dvc repro`` + ``push``, ``hescape inspect``  Dataset (panel, hash)
preprocess         ``hescape preprocess`` (training shards)                   Dataset (shards)
tune               ``hescape tune`` (Optuna; RayJob in cluster mode)          best overrides (JSON)
pretrain           ``hescape train`` (Ray Train; RayJob in cluster mode)      Model, Metrics, run id
evaluate           ``hescape evaluate --run`` (RayJob in cluster mode)        Metrics, run id
report             ``hescape report``                                         HTML, Markdown
register           MLflow model registry, alias ``champion``                  Model
cleanup-rayjobs    exit handler: delete the run's RayJobs                      -
=================  ========================================================  =========================

Every component is a lightweight Python component on the image ``$HESCAPE_COMPONENT_IMAGE``
(default ``hescape/component:dev``, built from ``docker/component.Dockerfile``) with
``packages_to_install=[]`` and ``install_kfp_package=False``: the image already holds the pinned
stack, and ``kfp.local``'s subprocess runner runs the same functions on the caller's interpreter.
"""

import os
from types import SimpleNamespace

from kfp import dsl

from hescape_components import bodies

ENV_IMAGE = "HESCAPE_COMPONENT_IMAGE"
DEFAULT_IMAGE = "hescape/component:dev"
NAMES = ("curate", "preprocess", "tune", "pretrain", "evaluate", "report", "register", "cleanup_rayjobs")


def component_image() -> str:
    """The component image: ``$HESCAPE_COMPONENT_IMAGE`` or ``hescape/component:dev``."""
    return os.environ.get(ENV_IMAGE) or DEFAULT_IMAGE


def make_components(image: str | None = None) -> SimpleNamespace:
    """The components, built on ``image`` (default :func:`component_image`), as attributes by name."""
    image = image or component_image()
    built = {}
    for name in NAMES:
        built[name] = dsl.component(getattr(bodies, name), base_image=image, packages_to_install=[],
                                    install_kfp_package=False)
    return SimpleNamespace(image=image, **built)


__all__ = ["DEFAULT_IMAGE", "ENV_IMAGE", "NAMES", "component_image", "make_components"]
