"""Download the worker's checkpoints into MODELS_DIR (for baking into the image, or a volume).

    python builder/download_models.py --models-dir /runpod-volume/models [--skip-qwen]

Each repo lands in ``MODELS_DIR/<repo name>``, the first place the worker looks
(``src/wan_worker/models.py``). Needs network access and, for gated repos, ``HF_TOKEN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import snapshot_download

from wan_worker.settings import Settings


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=settings.models_dir)
    parser.add_argument("--skip-qwen", action="store_true", help="don't fetch the prompt enhancer (~15 GB)")
    parser.add_argument("--skip-vace", action="store_true", help="don't fetch the reference-frame model")
    args = parser.parse_args()

    repos = [settings.t2v_model_id]
    if not args.skip_vace:
        repos.append(settings.vace_model_id)
    if not args.skip_qwen:
        repos.append(settings.qwen_model)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    # Only the diffusers/transformers safetensors layout the worker loads.
    files = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    for repo in repos:
        target = args.models_dir / Path(repo).name
        # VACE shares the T2V text encoder and VAE: only its transformer is loaded.
        patterns = ["model_index.json", "transformer/*"] if repo == settings.vace_model_id else files
        print(f"downloading {repo} -> {target}", flush=True)
        snapshot_download(repo, local_dir=target, token=token, allow_patterns=patterns)


if __name__ == "__main__":
    main()
