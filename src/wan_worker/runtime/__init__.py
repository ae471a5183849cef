"""The GPU runtime: model loading and residency, acceleration (compile, attention backends,
FP8), LoRA slots, the DMD sampler, library patches and readiness.

Imports ``contract`` and ``infra``."""
