"""Dagster shell over corpusforge: one asset per pipeline stage, partitioned by pipeline spec.

Load the definitions with ``dagster dev -m assets.definitions`` from the repository root.
"""
