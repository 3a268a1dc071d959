"""Experiment tracking in MLflow: the run tracker, and what a build records."""
