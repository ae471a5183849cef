"""The run's ``summary``: the headline number of each section, under numbered keys."""

from __future__ import annotations

from typing import Any

from .harness import r


def summary(result: dict[str, Any]) -> dict[str, Any]:
    s = result["sections"]
    w, ref = s.get("worker", {}), s.get("reference", {})
    un = w.get("uncached", {})
    cached = {k: v for k, v in w.items() if k.startswith("cached_")}
    default_cached = next((v for k, v in cached.items() if k.endswith("_default")), None) or next(
        iter(cached.values()), {}
    )
    vae = s.get("vae", {})
    cpu = s.get("cpu_stages", {})
    tr = s.get("transformer", {})
    best_tflops = max((v.get("tflops", 0) for v in tr.values() if isinstance(v, dict)), default=None)
    q = s.get("qwen", {})
    res = s.get("residency", {})
    out = {
        "1_video_fast_uncached_end_to_end_s": un.get("total_s"),
        "1_reference_pipeline_s": ref.get("total_s"),
        "1_speedup_vs_reference": r(ref["total_s"] / un["total_s"], 2)
        if ref.get("total_s") and un.get("total_s")
        else None,
        "2_transformer_best_tflops": best_tflops,
        "2_in_job_tflops_per_step": un.get("tflops_per_step"),
        "3_video_fast_cached_end_to_end_s": default_cached.get("total_s"),
        "3_cached_psnr_vs_uncached_db": default_cached.get("psnr_vs_uncached_db"),
        "4_vae_decode_s": {k: v.get("decode_s") for k, v in vae.items() if isinstance(v, dict) and "decode_s" in v},
        "5_cpu_stages_s": {k: v.get("total_s") for k, v in cpu.items() if isinstance(v, dict) and "total_s" in v},
        "6_cold_start_ready_s": s.get("cold_start", {}).get("ready_s"),
        "fidelity_psnr_vs_reference_db": un.get("psnr_vs_reference_db"),
        "qwen_decode_tok_s": (q.get("configured") or {}).get("decode_tok_s"),
        "qwen_load_from_disk_s": q.get("load_from_disk_s"),
        "residency_peak_gib": res.get("overall_peak_gib"),
    }
    cold = s.get("cold_start", {})
    for key in ("restart_with_caches", "restart_without_startup_files", "restart_with_artifacts_only"):
        if isinstance(cold.get(key), dict):
            out[f"6_cold_start_{key}_ready_s"] = cold[key].get("ready_s")
    fp8 = s.get("fp8", {})
    if fp8:
        out.update(
            {
                "7_fp8_applied": fp8.get("fp8_applied"),
                "7_fp8_psnr_vs_bf16_db": fp8.get("psnr_fp8_vs_bf16_db"),
                "7_fp8_end_to_end_s": (fp8.get("fp8") or {}).get("end_to_end_s"),
                "7_bf16_end_to_end_s": (fp8.get("bf16") or {}).get("end_to_end_s"),
                "7_fp8_speedup_forward": fp8.get("speedup_forward"),
            }
        )
    out.update(_new_feature_summary(s))
    out["as_shipped"] = result.get("versions", {}).get("as_shipped")
    return out


def _new_feature_summary(s: dict[str, Any]) -> dict[str, Any]:
    """Turbo, throughput, LoRA and long-video numbers (targets in the sections' ``targets``)."""
    out: dict[str, Any] = {}
    turbo = s.get("turbo", {})
    if turbo:
        out.update(
            {
                "8_turbo_video_end_to_end_s": (turbo.get("video") or {}).get("total_s"),
                "8_turbo_image_end_to_end_s": (turbo.get("image") or {}).get("total_s"),
                "8_turbo_speedup_vs_video_fast": turbo.get("speedup_vs_video_fast"),
            }
        )
    if s.get("turbo_residency"):
        out["8_turbo_all_resident_peak_gib"] = s["turbo_residency"].get("overall_peak_gib")
    lora = s.get("lora", {})
    if lora:
        out.update(
            {
                "9_lora_first_use_s": lora.get("first_use_s"),
                "9_lora_switch_cached_s": lora.get("switch_cached_s"),
                "9_lora_per_step_overhead_pct": lora.get("per_step_overhead_pct"),
                "9_lora_new_graphs_after_warmup": lora.get("new_graphs_after_warmup"),
            }
        )
    throughput = s.get("throughput", {})
    for kind in ("video_fast", "video_turbo"):
        row = throughput.get(kind)
        if isinstance(row, dict) and "seconds_per_job" in row:
            out[f"11_throughput_{kind}_s_per_job"] = row["seconds_per_job"]
            out[f"11_throughput_{kind}_jobs_per_gpu_hour"] = row["jobs_per_gpu_hour"]
            out[f"11_throughput_{kind}_concurrency2_upper_bound"] = row["concurrency2_upper_bound"]
            out[f"11_throughput_{kind}_concurrency2_gain"] = row.get("concurrency2_gain")
    long = s.get("long", {})
    for quality in ("fast", "turbo"):
        rows = long.get(quality)
        if not isinstance(rows, dict):
            continue
        for key, row in rows.items():
            if key != "checks" and isinstance(row, dict):
                out[f"10_long_{quality}_{key}_total_s"] = row.get("total_s")
                out[f"10_long_{quality}_{key}_per_segment_s"] = row.get("per_segment_s")
                out[f"10_long_{quality}_{key}_peak_vram_gib"] = row.get("peak_vram_gib")
        out[f"10_long_{quality}_checks"] = rows.get("checks")
    return out
