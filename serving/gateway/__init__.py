"""The OpenAI-compatible HTTP gateway (FastAPI on Ray Serve)."""
