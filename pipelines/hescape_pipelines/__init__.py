"""HESCAPE pipelines (KFP v2): the benchmark pipeline, its compiler, its local runner and its submitter.

- :mod:`hescape_pipelines.benchmark`: ``build_pipeline(cfg)`` / ``compile_pipeline(cfg, out)``;
- :mod:`hescape_pipelines.local`: ``run_local(...)``, the same pipeline on ``kfp.local``'s subprocess
  runner (what ``make run`` does);
- :mod:`hescape_pipelines.submit`: ``submit(host, params_file)`` to a Kubeflow Pipelines server.

The command line is ``hescape pipeline compile | run-local | submit``.
"""

from hescape_pipelines.benchmark import PIPELINE_NAME, build_pipeline, compile_pipeline

__all__ = ["PIPELINE_NAME", "build_pipeline", "compile_pipeline"]
