"""`edgecc bench`: latency, tokens/s, memory, size and accuracy, each configuration in its own process."""
