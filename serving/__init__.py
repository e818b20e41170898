"""The inference server with dynamic batching."""
