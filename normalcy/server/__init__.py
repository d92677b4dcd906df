"""HTTP inspection service (FastAPI on uvicorn) and its web page; `normalcy serve`."""

from __future__ import annotations

from normalcy.server.app import ServiceSettings, create_app, parse_model_arg

__all__ = ["ServiceSettings", "create_app", "parse_model_arg"]
