"""Tiny random-weight models in the real on-disk formats (``MODEL_PROFILE=tiny``).

They are built in code (no download), saved with ``save_pretrained`` exactly like the real
checkpoints, and then loaded by the same ``from_pretrained`` code as the full profile. The
architectures are the real ones, only narrower, so every pipeline path runs on a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

T2V_DIR = "Wan2.1-T2V-1.3B-Diffusers"
VACE_DIR = "Wan2.1-VACE-1.3B-diffusers"
TURBO_DIR = "FastWan2.1-T2V-1.3B-Diffusers"
QWEN_BASE_DIR = "Qwen2.5-7B"
QWEN_INSTRUCT_DIR = "Qwen2.5-7B-Instruct"

_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ensure_tiny_models(root: Path) -> Path:
    """Build the tiny checkpoints under ``root`` once; concurrent callers are safe."""
    root.mkdir(parents=True, exist_ok=True)
    builders = {
        T2V_DIR: _save_t2v,
        VACE_DIR: _save_vace,
        TURBO_DIR: _save_turbo,
        QWEN_BASE_DIR: lambda d: _save_qwen(d, instruct=False),
        QWEN_INSTRUCT_DIR: lambda d: _save_qwen(d, instruct=True),
    }
    for name, build in builders.items():
        target = root / name
        if (target / ".complete").exists():
            continue
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        torch.manual_seed(0)
        build(staging)
        (staging / ".complete").touch()
        try:
            os.replace(staging, target)  # atomic; a racing builder's copy is identical
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _umt5_parts():
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return tokenizer, UMT5EncoderModel(config).eval()


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )


def _save_t2v(path: Path) -> None:
    from diffusers import WanPipeline, WanTransformer3DModel

    tokenizer, text_encoder = _umt5_parts()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(),
        scheduler=_scheduler(),
        transformer=WanTransformer3DModel(**_TRANSFORMER),
    )
    pipe.save_pretrained(path)


def _save_turbo(path: Path) -> None:
    """The distilled checkpoint's layout: a whole diffusers folder whose transformer also
    carries the sparse-attention gate (``attn1.to_gate_compress``, one Linear per block) that
    diffusers' dense ``WanTransformer3DModel`` has no module for."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    _save_t2v(path)
    torch.manual_seed(1)  # its own weights: a test can tell which transformer ran
    WanTransformer3DModel(**_TRANSFORMER).save_pretrained(path / "transformer")
    weights_file = path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    inner = _TRANSFORMER["num_attention_heads"] * _TRANSFORMER["attention_head_dim"]
    for block in range(_TRANSFORMER["num_layers"]):
        weights[f"blocks.{block}.attn1.to_gate_compress.weight"] = torch.randn(inner, inner) * 0.02
        weights[f"blocks.{block}.attn1.to_gate_compress.bias"] = torch.zeros(inner)
    save_file(weights, weights_file, metadata={"format": "pt"})


def _save_vace(path: Path) -> None:
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    tokenizer, text_encoder = _umt5_parts()
    transformer = WanVACETransformer3DModel(
        **{**_TRANSFORMER, "num_layers": 3}, vace_layers=[0, 2], vace_in_channels=96
    )
    WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(), scheduler=_scheduler(), transformer=transformer
    ).save_pretrained(path)


def _save_qwen(path: Path, *, instruct: bool) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    if instruct:
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>" if instruct else "<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
