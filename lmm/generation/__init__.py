"""Batched, batch-invariant decoding with a KV cache: used by training, evaluation, chat and the API."""
