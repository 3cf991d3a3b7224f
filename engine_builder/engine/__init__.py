"""The torch engine: paged KV cache, in-flight batching scheduler, model runner and sampler (CPU and CUDA)."""
