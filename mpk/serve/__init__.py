"""`mpk serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around one `LLM`; and
`mpk bench-serve`'s load generator (`loadgen`), which needs httpx only.

Imported only by the serve commands and their tests, so `import mpk` never pulls in FastAPI; and
`create_app` is imported on first use, so the load generator runs without FastAPI.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from mpk.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
