"""Library side of the pipeline: the steps its KFP components wrap, and its cluster mode.

- :mod:`hescape.orchestration.steps`: one function per pipeline step (curate, preprocess, tune,
  pretrain, evaluate, report, register, cleanup). Each runs in ``local`` mode (in this process,
  local Ray, the local DVC remote, MLflow on SQLite) or in ``cluster`` mode (a KubeRay RayJob that
  runs the same ``hescape`` CLI). KFP components are thin wrappers around these functions.
- :mod:`hescape.orchestration.rayjob`: build a RayJob from the suspended template, create it, watch
  it with a deadline, surface its logs and always delete it.
- :mod:`hescape.orchestration.data`: fetch a DVC-versioned panel by its hash from a DVC remote,
  without the git repository (what cluster pods do).
- :mod:`hescape.orchestration.project`: find the repository's ``components/`` and ``pipelines/``.

Nothing here imports KFP, Ray, MLflow or the Kubernetes client at module level.
"""
