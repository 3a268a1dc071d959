"""The logged reranker's model code (MLflow "models from code"): the file `registry.register_model`
logs as ``python_model``, which MLflow runs to build the model when it loads it, so no pickled
Python object is stored (see `reranker_pyfunc.RerankerModel`)."""

import mlflow.models

from corpusforge.train.reranker_pyfunc import RerankerModel

mlflow.models.set_model(RerankerModel())
