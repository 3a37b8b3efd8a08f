"""Serving: an OpenAI-compatible HTTP server over one base with many adapters and variants.

engine.py (continuous batching, one thread) <- registry.py (model ids) <- app.py (FastAPI routes)
"""

from qwenlab.serve.limits import ServeLimits
from qwenlab.serve.server import ServeConfig, build_app, serve

__all__ = ["ServeConfig", "ServeLimits", "build_app", "serve"]
