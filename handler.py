"""RunPod serverless entry point: ``python handler.py`` (see README).

Before the heavy imports, the library files that the last start recorded are read into the
page cache in the background (``pagecache``): on a cold disk the imports then find them there.
"""

from wan_worker.contract.settings import get_settings
from wan_worker.infra import pagecache

pagecache.prefetch_startup_files(get_settings().compile_cache_dir)

import runpod  # noqa: E402 - after the prefetch started

from wan_worker.serving.worker import serverless_config  # noqa: E402

runpod.serverless.start(serverless_config())
