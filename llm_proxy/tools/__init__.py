"""Server-side tools: what the proxy runs itself when the model calls a function."""
