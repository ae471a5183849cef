"""Every environment variable the worker reads, in one place, with defaults.

Nothing else in the package touches ``os.environ``; modules receive a ``Settings`` object.
Secrets are ``SecretStr`` so that ``repr()`` and logs never show them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wan_worker.contract.presets import Quality

#: Names of the variables whose *values* are secret. ``debug_env`` reports only whether they
#: are set, and the log redaction filter masks their values wherever they appear.
SECRET_ENV_VARS = (
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
    "CALLBACK_SECRET",
    "HF_TOKEN",
    "RUNPOD_AI_API_KEY",
    "RUNPOD_WEBHOOK_GET_JOB",
    "RUNPOD_WEBHOOK_POST_OUTPUT",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- models -------------------------------------------------------------------------
    model_profile: Literal["full", "tiny"] = "full"
    models_dir: Path = Path("/runpod-volume/models")
    baked_models_dir: Path = Path("/models")
    hf_home: Path | None = None
    t2v_model_id: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    vace_model_id: str = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
    qwen_model: str = "Qwen/Qwen2.5-7B"
    #: The DMD-distilled transformer of ``quality: "turbo"`` (a repo id or a local directory).
    turbo_model_id: str = "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"
    tiny_models_dir: Path = Path.home() / ".cache" / "wan-worker" / "tiny-models"
    vae_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    gpu_memory_budget_gb: float | None = Field(default=None, gt=0)
    warmup_on_start: bool = True
    warmup_qwen: bool = False

    # --- speed ----------------------------------------------------------------------------
    compile_transformer: bool = True  # regional compile, CUDA only (accel.py)
    attention_backend: str | None = "auto"  # "auto": fastest measured; or a diffusers backend name
    fuse_qkv: bool = False
    cudnn_benchmark: bool = True
    vae_channels_last: bool = True
    compile_vae: bool = True  # fused norm + SiLU kernels in the VAE decoder, CUDA only (accel.py)
    step_cache_threshold: float = Field(default=0.08, ge=0, le=1)
    #: "fp8": FP8 self-attention (FA3) + float8 linears (torchao) on Hopper; else bf16 (accel.py)
    precision: Literal["bf16", "fp8"] = "bf16"
    #: where the portable compile artifacts are saved after the warm-up and loaded at start
    compile_cache_dir: Path = Path("/runpod-volume/.cache/wan-worker")

    # --- storage --------------------------------------------------------------------------
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: SecretStr | None = None
    bucket_secret_access_key: SecretStr | None = None
    bucket_name: str = "workspace-temp"
    bucket_region: str = "us-east-1"
    presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    upload_attempts: int = Field(default=4, ge=1, le=10)
    upload_timeout_s: float = Field(default=30.0, gt=0)
    inline_max_bytes: int = Field(default=5 * 1024 * 1024, ge=0)

    # --- references -----------------------------------------------------------------------
    reference_max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    reference_max_pixels: int = Field(default=40_000_000, gt=0)
    reference_timeout_s: float = Field(default=10.0, gt=0)
    reference_max_redirects: int = Field(default=3, ge=0)
    allow_private_reference_urls: bool = False

    # --- prompt enhancement ---------------------------------------------------------------
    enhance_timeout_s: float = Field(default=20.0, gt=0)
    enhance_max_new_tokens: int = Field(default=320, ge=16, le=1024)
    enhance_cache_size: int = Field(default=256, ge=0)
    enhance_compile: bool = True  # static cache + CUDA-graph decode, CUDA only (accel.py)
    enhance_max_cache_len: int = Field(default=2048, ge=256, le=32768)

    # --- LoRAs (loras.py) -------------------------------------------------------------------
    lora_dir: Path = Path("/runpod-volume/loras")
    max_loras_per_job: int = Field(default=3, ge=0, le=8)  # also the number of swap slots per transformer
    lora_cache_gb: float = Field(default=2.0, ge=0)
    max_lora_rank: int = Field(default=64, ge=1, le=1024)  # slot rank: larger LoRAs are refused

    # --- jobs, callback, metrics ----------------------------------------------------------
    #: The quality of jobs that give none; when set it wins over the job type's preset quality.
    default_quality: Quality | None = None
    job_timeout_s: float = Field(default=900.0, gt=0)
    #: Long videos (long_video.py): frames per VACE-continued segment (4k+1), and the longest
    #: clip still made in one pass (longer ones are made in segments).
    segment_frames: int = Field(default=81, ge=5, le=121)
    single_pass_max_frames: int = Field(default=121, ge=5, le=121)
    worker_concurrency: int = Field(default=1, ge=1, le=16)
    work_dir: Path | None = None
    callback_url: str | None = None
    callback_secret: SecretStr | None = None
    callback_allowed_hosts: str = ""
    callback_timeout_s: float = Field(default=10.0, gt=0)
    callback_attempts: int = Field(default=4, ge=1, le=10)
    slow_generation_s: float = Field(default=300.0, gt=0)
    small_file_bytes: int = Field(default=100_000, ge=0)
    log_level: str = "INFO"
    #: The RunPod SDK's own level. Its default, DEBUG, logs every job's whole output
    #: (prompts included), so the worker lowers it to INFO (docs/OPERATIONS.md).
    runpod_log_level: Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR"] = "INFO"

    # --- only ever redacted or reported as set/unset ---------------------------------------
    hf_token: SecretStr | None = None
    runpod_ai_api_key: SecretStr | None = None
    #: Set by RunPod on a deployed worker; unset in local runs, where the SDK has no job API
    #: to send progress to (the SDK itself picks local mode the same way).
    runpod_webhook_get_job: SecretStr | None = None
    runpod_webhook_post_output: SecretStr | None = None

    @field_validator("bucket_endpoint_url", "callback_url", "attention_backend", "default_quality", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("segment_frames")
    @classmethod
    def _four_k_plus_one(cls, value: int) -> int:
        if value % 4 != 1:
            raise ValueError("SEGMENT_FRAMES must be 4k+1 (Wan's VAE compresses time 4x)")
        return value

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id and self.bucket_secret_access_key)

    @property
    def job_api_available(self) -> bool:
        """Whether RunPod's job API (which also takes progress updates) is there to post to."""
        return bool(self.runpod_webhook_get_job and self.runpod_webhook_post_output)

    @property
    def allowed_callback_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.callback_allowed_hosts.split(",") if h.strip())

    def secret_values(self) -> list[str]:
        """Values that must never appear in logs or outputs (used by the redaction filter)."""
        # The access key *id* is not here: it is an identifier that every presigned URL
        # carries by design (SigV4 X-Amz-Credential); the secret key never leaves the worker.
        secrets = (
            self.bucket_secret_access_key,
            self.callback_secret,
            self.hf_token,
            self.runpod_ai_api_key,
        )
        return [v for s in secrets if s is not None and len(v := s.get_secret_value()) >= 4]


def env_presence(names: tuple[str, ...]) -> dict[str, bool]:
    """Whether each variable is set and non-empty. Never returns a value or a fragment of one."""
    return {name: bool(os.environ.get(name)) for name in names}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
