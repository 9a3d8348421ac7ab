"""The LM runtime: prefill and decode through a KV cache, greedy generation."""
