"""RunPod serverless entry point: ``python handler.py`` (see README)."""

import runpod

from wan_worker.worker import concurrency_modifier, handler

runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
