"""Data I/O: Parquet datasets, file systems (local, S3), Arrow schemas, content hashes, data contracts, benchmark datasets."""
