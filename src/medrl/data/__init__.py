"""Data layer: phantoms, real-data ingest, prompts, reports, tokenizer, prepare stages, Datasets."""
