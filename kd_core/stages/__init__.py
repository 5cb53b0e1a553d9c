"""The stages: one module per stage, each holding only the stage contract's bookkeeping.

    prep -> teacher -> cache -> distill (+ baseline) -> eval -> register      (and tune)

A stage function takes its config section and its input manifests and returns its manifest
(`kd_core/stage.py`: key, reuse, lease, manifest); the work itself is the job's task's and the
library's (`kd_core/tasks`, `data/`, `train/`, `eval/`, `registry/`, `tune/`). `kd_core.pipeline`
runs them in order; the Kubeflow components call the same functions.
"""
