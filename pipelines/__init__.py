"""Kubeflow Pipelines DAGs built from a job config (see pipelines/distill_pipeline.py)."""
