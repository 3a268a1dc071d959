"""Query-time retrieval over a built index: first-stage search (dense, BM25, hybrid) and late-interaction reranking."""
