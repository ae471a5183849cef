"""RunPod serverless worker for Wan 2.1 video and image generation.

The package is cut into layers, each a folder; a module imports only from its own layer and
the layers listed before it (``tests/test_imports.py`` checks this):

* ``contract``: the wire format and vocabularies (presets, input/output schema, jobs, errors,
  settings: the one place that reads the environment).
* ``infra``: process plumbing with no model or job logic (structured logs, outbound HTTP,
  the local S3 server for development).
* ``runtime``: the GPU side (model loading and residency, acceleration, FP8, LoRA slots,
  the DMD sampler, library patches, readiness).
* ``stages``: one job's steps (references, prompt enhancement, generation, media encoding,
  storage, progress, callback, long-video planning and stitching).
* ``serving``: the entry (``worker``: the RunPod handler; ``flow``: the numbered stages in
  order; ``result``; ``long_video``; ``actions``).
"""
