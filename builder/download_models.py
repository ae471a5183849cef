"""Download the worker's checkpoints into MODELS_DIR (for baking into the image, or a volume).

    python builder/download_models.py --models-dir /runpod-volume/models [--skip-qwen] [--skip-vace] [--skip-turbo]
    python builder/download_models.py --models-dir /runpod-volume/models --only-turbo

Each repo lands in ``MODELS_DIR/<repo name>``, the first place the worker looks
(``src/wan_worker/models.py``). Needs network access and, for gated repos, ``HF_TOKEN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import snapshot_download

from wan_worker.contract.settings import Settings


def main() -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=settings.models_dir)
    parser.add_argument("--skip-qwen", action="store_true", help="don't fetch the prompt enhancer (~15 GB)")
    parser.add_argument("--skip-vace", action="store_true", help="don't fetch the reference-frame model")
    parser.add_argument("--skip-turbo", action="store_true", help="don't fetch the distilled model of quality 'turbo'")
    parser.add_argument("--only-turbo", action="store_true", help="fetch only the distilled model of quality 'turbo'")
    args = parser.parse_args()

    if args.only_turbo:
        repos = [settings.turbo_model_id]
    else:
        repos = [settings.t2v_model_id]
        if not args.skip_vace:
            repos.append(settings.vace_model_id)
        if not args.skip_turbo:
            repos.append(settings.turbo_model_id)
        if not args.skip_qwen:
            repos.append(settings.qwen_model)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    # Only the diffusers/transformers safetensors layout the worker loads.
    files = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    for repo in repos:
        target = args.models_dir / Path(repo).name
        # VACE and turbo share the T2V text encoder and VAE: only their transformers are loaded
        # (turbo's text encoder and VAE configs come along: the worker checks they match).
        if repo == settings.vace_model_id:
            patterns = ["model_index.json", "transformer/*"]
        elif repo == settings.turbo_model_id:
            patterns = ["model_index.json", "transformer/*", "text_encoder/config.json", "vae/config.json"]
        else:
            patterns = files
        print(f"downloading {repo} -> {target}", flush=True)
        snapshot_download(repo, local_dir=target, token=token, allow_patterns=patterns)


if __name__ == "__main__":
    main()
