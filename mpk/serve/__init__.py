"""`mpk serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one `LLM`.

Imported only by the serve command and its tests, so `import mpk` never pulls in FastAPI.
"""

from mpk.serve.app import create_app

__all__ = ["create_app"]
