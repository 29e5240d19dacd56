"""The context-managing OpenAI-compatible chat proxy."""
