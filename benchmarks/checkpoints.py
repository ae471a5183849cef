"""The checkpoints the benchmark runs on: random weights of the real architectures
(Wan2.1-T2V-1.3B with a UMT5-XXL-shaped encoder and the default VAE, the Wan2.1-VACE-1.3B
transformer, the FastWan2.1-T2V-1.3B turbo transformer, a Qwen2.5-7B-shaped model) saved as
the real checkpoints are laid out, and LoRA files on the real layer shapes. Random weights
cost exactly what trained weights cost per step."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import FULL_MODELS, QWEN_REPO, T2V_REPO, TURBO_REPO, VACE_REPO, GiB, free_cuda, now, r

if TYPE_CHECKING:
    from .context import Context

#: The real architectures (Wan2.1-T2V-1.3B, UMT5-XXL encoder, Wan2.1-VACE-1.3B, Qwen2.5-7B).
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
VACE_EXTRA = dict(vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
)
QWEN_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
)


def _umt5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _qwen_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer whose vocabulary covers every id the model can emit."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    n_regular = vocab_size - len(specials)
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= n_regular:
                break
            vocab.setdefault(a + b, len(vocab))
    i = 0
    while len(vocab) < n_regular:  # three-symbol pieces for the rest
        a, b, c = alphabet[i % 256], alphabet[(i // 256) % 256], alphabet[(i // 65536) % 256]
        vocab.setdefault(a + b + c, len(vocab))
        i += 1
    # Pair merges over printable ASCII (and the space marker): about two characters a token,
    # so the enhancer's prompt has a realistic length (the real tokenizer: about four).
    printable = [bytes_to_unicode()[b] for b in range(32, 127)]
    merges = [(a, b) for a in printable for b in printable]
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )


@contextlib.contextmanager
def _build_on(device: str, dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def write_full_models(models_dir: Path, which: tuple[str, ...] = FULL_MODELS) -> dict[str, Any]:
    """Random weights of the real architectures, saved as the real checkpoints are laid out."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {}
    models_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "t2v": models_dir / Path(T2V_REPO).name,
        "vace": models_dir / Path(VACE_REPO).name,
        "qwen": models_dir / Path(QWEN_REPO).name,
        "turbo": models_dir / Path(TURBO_REPO).name,
    }
    for name in which:
        target = targets[name]
        if (target / ".complete").exists():
            report[name] = {"path": str(target), "reused": True, "gib_on_disk": r(dir_bytes(target) / GiB, 2)}
            continue
        shutil.rmtree(target, ignore_errors=True)
        started = now()
        torch.manual_seed(0)
        if name == "t2v":
            from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
            from transformers import UMT5Config, UMT5EncoderModel

            with _build_on(device, torch.bfloat16):
                transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
                encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
            with _build_on(device, torch.float32):
                vae = AutoencoderKLWan()
            pipe = WanPipeline(
                tokenizer=_umt5_tokenizer(),
                text_encoder=encoder,
                vae=vae,
                scheduler=_scheduler(),
                transformer=transformer,
            )
            pipe.save_pretrained(target)
            del pipe, transformer, encoder, vae
        elif name == "vace":
            from diffusers import WanVACETransformer3DModel

            with _build_on(device, torch.bfloat16):
                transformer = WanVACETransformer3DModel(**WAN_TRANSFORMER, **VACE_EXTRA)
            transformer.save_pretrained(target / "transformer")
            (target / "model_index.json").write_text(
                json.dumps({"_class_name": "WanVACEPipeline", "note": "bench: transformer only"})
            )
            del transformer
        elif name == "turbo":
            _write_turbo(target, device)
        else:
            from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

            tok = _qwen_tokenizer(QWEN_7B["vocab_size"])
            eos = tok.convert_tokens_to_ids("<|endoftext|>")
            with _build_on(device, torch.bfloat16):
                model = Qwen2ForCausalLM(
                    Qwen2Config(**QWEN_7B, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
                ).eval()
            model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
            model.save_pretrained(target)
            tok.save_pretrained(target)
            del model
        free_cuda()
        (target / ".complete").touch()
        report[name] = {
            "path": str(target),
            "seconds": r(now() - started, 1),
            "gib_on_disk": r(dir_bytes(target) / GiB, 2),
        }
    return report


def _write_turbo(target: Path, device: str) -> None:
    """The distilled checkpoint as the worker reads it: the dense Wan 1.3B transformer plus the
    sparse-attention gate (``attn1.to_gate_compress``) the real file carries and the worker skips.
    No ``text_encoder``/``vae`` configs: the worker then takes them as the base model's."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    with _build_on(device, torch.bfloat16):
        transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
    transformer.save_pretrained(target / "transformer", max_shard_size="100GB")
    del transformer
    weights_file = target / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    inner = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]
    for block in range(WAN_TRANSFORMER["num_layers"]):
        weights[f"blocks.{block}.attn1.to_gate_compress.weight"] = (
            torch.randn(inner, inner, dtype=torch.bfloat16) * 0.02
        )
        weights[f"blocks.{block}.attn1.to_gate_compress.bias"] = torch.zeros(inner, dtype=torch.bfloat16)
    save_file(weights, weights_file, metadata={"format": "pt"})
    (target / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "note": "bench: transformer only (shares UMT5 and VAE)"})
    )


def write_lora(path: Path, *, dim: int, ffn: int, layers: int, rank: int, seed: int) -> int:
    """A PEFT/diffusers-format LoRA on every linear of every block (attention q/k/v/out of
    self- and cross-attention, both FFN projections) at the given shapes; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    shapes = {f"{a}.{p}": (dim, dim) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= {"ffn.net.0.proj": (dim, ffn), "ffn.net.2": (ffn, dim)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, (n_in, n_out) in shapes.items():
            base = f"transformer.blocks.{i}.{module}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).to(torch.bfloat16)
            tensors[f"{base}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.01).to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.stat().st_size


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_models(ctx: Context) -> dict[str, Any]:
    """Section ``write_models``: the tiny profile's checkpoints, or the full ones ``--models`` names."""
    if ctx.tiny:
        from wan_worker.runtime.tiny import ensure_tiny_models

        started = now()
        ensure_tiny_models(ctx.tiny_dir)
        return {"profile": "tiny", "seconds": r(now() - started, 1)}
    which = tuple(w for w in FULL_MODELS if w in ctx.args.models)
    return write_full_models(ctx.models_dir, which)
