"""Dagster shell over corpusforge: one asset per pipeline stage, partitioned by pipeline spec.

The code location is `corpusforge_dagster.definitions`; ``dg dev`` or ``dagster dev`` from the
repository root loads it with no flags (``[tool.dg]`` in ``pyproject.toml``).
"""
