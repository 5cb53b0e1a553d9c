"""Kubeflow Pipelines components, one per kdflow stage (see components/stages.py)."""
