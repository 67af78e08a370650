"""onnxattr on Ray Data: `Attribute`, a stage for your own pipelines (app/ray_stage.py). The
whole audit on Ray is `run_audit(..., engine="ray")` or `onnxattr audit --engine ray`."""

from .app.ray_stage import Attribute

__all__ = ["Attribute"]
