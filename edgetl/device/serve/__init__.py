"""`edgetl serve`: an inference service for one bundle (extra ``edgetl[serve]``: Starlette, Uvicorn
and its httptools parser, prometheus-client, python-multipart). No torch.

- :mod:`.engine`: the loaded model, its worker thread and bounded queue (micro-batching), hot swap;
- :mod:`.app`: the Starlette app (``/v1/predict``, ``/v1/health``, ``/v1/model``, ``/metrics``, the page);
- :mod:`.server`: Uvicorn, TLS, signals and the drain on SIGTERM.

The web modules are imported on use, so ``edgetl.device.serve.engine`` works without the extra.
"""

from __future__ import annotations

from edgetl.device.serve.engine import Engine, EngineSettings, Job, ModelSlot, NotReady, QueueFull, bundle_version

__all__ = ["Engine", "EngineSettings", "Job", "ModelSlot", "NotReady", "QueueFull", "bundle_version"]
