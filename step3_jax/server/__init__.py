"""``step3-jax serve``: an OpenAI-compatible HTTP server over `step3_jax.engine.Engine`.

Needs the optional extra ``serve`` (``pip install 'step3-jax[serve]'``: FastAPI + uvicorn).
`create_app` builds the ASGI app for any engine; `serve` loads a model (the demo checkpoint by
default), builds the engine and runs uvicorn.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "create_app":
        from step3_jax.server.app import create_app

        return create_app
    if name in ("serve", "build_engine"):
        from step3_jax.server import main

        return getattr(main, name)
    raise AttributeError(f"module 'step3_jax.server' has no attribute {name!r}")


__all__ = ["build_engine", "create_app", "serve"]
