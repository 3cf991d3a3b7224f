"""Encoders (BEI / BEI-Bert): embeddings, rerank and classification with token-budget dynamic batching.

Life of a request: routes (HTTP, protocol) -> engine (checks, tokenizer) -> batcher (token-budget
batches in a worker thread) -> models (transformers module + pooling) -> results (scores, normalization).
Start-up: loader reads the checkpoint (models, st_layout) into a model, a tokenizer and an EncoderInfo.
"""
