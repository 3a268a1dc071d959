"""Document processing: extraction from raw sources, cleaning and deduplication, chunking."""
