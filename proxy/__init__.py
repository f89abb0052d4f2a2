"""A streaming LLM API gateway on trio: one OpenAI-compatible endpoint, backpressured SSE relay."""

__version__ = "0.1.0"
