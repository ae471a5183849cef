"""Where each checkpoint lives on disk: an explicit directory, ``MODELS_DIR``, the image's baked
directory, or a Hugging Face cache. No torch import, so the builder and tools can use it cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wan_worker.contract.errors import ModelUnavailable
from wan_worker.contract.settings import Settings

DOWNLOAD_HINT = "python builder/download_models.py --models-dir {models_dir}"


@dataclass
class ModelLocator:
    """Where a checkpoint lives: a local directory, ``MODELS_DIR`` or the HF cache."""

    settings: Settings

    def resolve(self, repo_id: str, fetch_command: str | None = None) -> Path:
        """``fetch_command``: what the error tells the operator to run when the weights are missing."""
        s = self.settings
        if Path(repo_id).is_dir():  # an explicit local checkpoint wins in every profile
            return Path(repo_id)
        if s.model_profile == "tiny":
            from wan_worker.runtime import tiny

            path = tiny.ensure_tiny_models(s.tiny_models_dir) / Path(repo_id).name
            if path.is_dir():
                return path
            raise ModelUnavailable(
                f"model weights for {repo_id} not found among the tiny models in {s.tiny_models_dir}; "
                f"the full profile fetches them with: {fetch_command or DOWNLOAD_HINT.format(models_dir=s.models_dir)}",
                retryable=False,
            )
        candidates = [
            root / name for root in (s.models_dir, s.baked_models_dir) for name in (repo_id, Path(repo_id).name)
        ]
        for path in candidates:
            if path.is_dir() and any(path.iterdir()):
                return path
        from huggingface_hub import constants, snapshot_download

        cache_dirs = [None, Path("/runpod-volume/huggingface-cache/hub")]
        if s.hf_home:
            cache_dirs.insert(0, s.hf_home / "hub")
        for cache_dir in cache_dirs:
            try:
                return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
            except Exception:  # noqa: BLE001 - any miss means "not in this cache"
                continue
        searched = [*dict.fromkeys(map(str, candidates))]
        caches = [*dict.fromkeys(str(d or constants.HF_HUB_CACHE) for d in cache_dirs)]
        raise ModelUnavailable(
            f"model weights for {repo_id} not found; searched {', '.join(searched)} and the Hugging Face "
            f"cache{'s' if len(caches) > 1 else ''} {', '.join(caches)}; download them with: "
            f"{fetch_command or DOWNLOAD_HINT.format(models_dir=s.models_dir)} (or mount a network volume at /runpod-volume)",
            retryable=False,
            details={"searched": searched, "hf_caches": caches},
        )
