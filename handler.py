"""RunPod serverless entry point: ``python handler.py`` (see README)."""

import runpod

from wan_worker.serving.worker import serverless_config

runpod.serverless.start(serverless_config())
