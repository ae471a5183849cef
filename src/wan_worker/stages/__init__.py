"""One job's steps: references, prompt enhancement, generation, media, storage, progress,
callback, and the planning and stitching of long videos.

Imports ``contract``, ``infra`` and ``runtime``."""
