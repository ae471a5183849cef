"""RunPod serverless entry point: ``python handler.py`` (see README)."""

from wan_worker.prefetch import prefetch_on_start
from wan_worker.settings import get_settings

# Before the heavy imports below: the disk reads the checkpoints while Python imports.
prefetch = prefetch_on_start(get_settings())

import runpod  # noqa: E402

from wan_worker.worker import serverless_config  # noqa: E402

runpod.serverless.start(serverless_config(prefetch))
