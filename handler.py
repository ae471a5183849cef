"""RunPod serverless entry point: ``python handler.py`` (see README)."""

import os

# The SDK's default level is DEBUG, at which it logs every job's whole output (prompts
# included). INFO keeps prompts out of the logs (docs/OPERATIONS.md); set RUNPOD_LOG_LEVEL
# (or RUNPOD_DEBUG_LEVEL) to override. It must be set before the SDK is imported.
if not os.environ.get("RUNPOD_DEBUG_LEVEL"):
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402

from wan_worker.worker import serverless_config  # noqa: E402

runpod.serverless.start(serverless_config())
