"""Encoders (BEI / BEI-Bert): embeddings, rerank and classification with token-budget dynamic batching.

Life of a request: routes (HTTP, wire formats) -> engine (validation, tokenizer) -> batcher (token-budget
batches, worker thread) -> models (transformers module + pooling) -> engine (scores, normalization).
"""
