"""Text to vectors: the packaged models, the encoder, the embedding cache, the query tower and its ONNX export."""
