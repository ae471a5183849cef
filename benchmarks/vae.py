"""Section ``vae``: decode in fp32 / bf16 / channels-last / fused norms, time and PSNR vs
fp32, and a kernel profile of the worker's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .context import Context
from .harness import free_cuda, gpu_peak_gib, now, psnr, r, reset_peak, sync


def vae(ctx: Context) -> dict[str, Any]:
    """Decode one latent video with each precision/setting; PSNR against fp32."""
    import torch
    from diffusers import AutoencoderKLWan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = ctx.t2v_dir()
    lat_frames = (ctx.frames - 1) // 4 + 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, 16, lat_frames, ctx.height // 8, ctx.width // 8, generator=gen)
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    # (name, dtype, cuDNN autotune, channels-last weights, fused norm + SiLU kernels)
    variants = [("fp32", torch.float32, False, False, False), ("bf16", torch.bfloat16, False, False, False)]
    if device == "cuda":
        variants += [
            ("bf16_channels_last_cudnn_benchmark", torch.bfloat16, True, True, False),
            ("bf16_channels_last_fused_norms", torch.bfloat16, True, True, True),
        ]
    for name, dtype, bench, channels_last, fused in variants:
        try:
            torch.backends.cudnn.benchmark = bench
            vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=dtype).to(device)
            from wan_worker.runtime.accel import compile_vae_norms, vae_channels_last

            if channels_last:
                vae_channels_last(vae)
            if fused:
                compile_vae_norms(vae)
            x = latents.to(device, dtype)
            times = []
            reset_peak()
            with torch.inference_mode():
                for _ in range(3 if device == "cuda" else 1):
                    sync()
                    t = now()
                    video = vae.decode(x, return_dict=False)[0]
                    sync()
                    times.append(now() - t)
            frames = ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
            outputs[name] = frames
            results[name] = {
                "first_s": r(times[0]),
                "decode_s": r(times[-1]),
                "peak_gib": gpu_peak_gib(),
                "psnr_vs_fp32": psnr(frames, outputs.get("fp32")),
            }
            del vae, video, x
            free_cuda()
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if device == "cuda":
        results["profile"] = profile_vae(ctx, path, latents)
    torch.backends.cudnn.benchmark = False
    results["note"] = "random latents through the real VAE config; frames in [0,1]"
    return results


def profile_vae(ctx: Context, path: Path, latents) -> dict[str, Any]:
    """Where the worker's VAE decode spends GPU time: the top kernels by self CUDA time."""
    import torch
    from diffusers import AutoencoderKLWan

    from wan_worker.runtime.accel import optimize_vae

    torch.backends.cudnn.benchmark = True
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.bfloat16).to("cuda")
    optimize_vae(vae, ctx.settings())
    x = latents.to("cuda", torch.bfloat16)
    with torch.inference_mode():
        vae.decode(x, return_dict=False)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            vae.decode(x, return_dict=False)
            sync()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    del vae, x
    free_cuda()
    return {
        "gpu_s": r(total / 1e6),
        "top": [
            {
                "name": e.key[:90],
                "s": r(e.self_device_time_total / 1e6),
                "share": r(e.self_device_time_total / total, 3),
                "calls": e.count,
            }
            for e in top
        ],
    }
