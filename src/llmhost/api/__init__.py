"""The HTTP service: an OpenAI-compatible FastAPI app over any engine (`create_app`)."""

from llmhost.api.app import create_app

__all__ = ["create_app"]
