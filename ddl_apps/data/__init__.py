"""Prepared datasets: a recipe's data read, preprocessed and written once (`ddl data prepare`) as shards of Arrow IPC
record batches with a manifest, then streamed by each worker from a local folder or object storage, each worker
reading only the chunks it trains on. See docs/data.md."""
