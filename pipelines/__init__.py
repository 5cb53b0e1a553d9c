"""Kubeflow Pipelines DAGs built from a job config (`dags`), and compiling, running, submitting and
scheduling them (`engines`)."""
