"""corpusforge: raw text corpora to evaluated, versioned retrieval indexes, and their serving.

Importing the package is cheap and never imports an orchestrator (dagster, airflow); heavy
modules (torch, faiss, mlflow) load only when their stage runs.
"""

__version__ = "0.1.0"
