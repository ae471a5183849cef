"""Section ``qwen``: load time from local disk, decode tokens/s as configured, without the
deferred stop check, and eager with a dynamic cache; the real enhancer call."""

from __future__ import annotations

from typing import Any

from .context import Context
from .harness import PROMPT, drop_page_cache, gpu_peak_gib, now, r, reset_peak, sync


def qwen(ctx: Context) -> dict[str, Any]:
    """Qwen load from disk (the worker's path), decode tokens/s as configured, each decode
    optimisation switched off in turn, and eager with a dynamic cache."""
    import torch

    from wan_worker.runtime.models import ModelManager
    from wan_worker.stages.enhance import Enhancer, completion_prompt, generation_kwargs

    res: dict[str, Any] = {"page_cache_dropped": drop_page_cache()}
    settings = ctx.settings()
    manager = ModelManager(settings)
    t = now()
    model, tok = manager.qwen()
    res["load_total_s"] = r(now() - t, 2)
    res["prepare"] = manager.accel.as_dict().get("qwen", {})
    warm = res["prepare"].get("warmup_seconds") or 0.0
    res["load_from_disk_s"] = r(res["load_total_s"] - warm, 2)
    res["device"] = str(next(model.parameters()).device)
    ids = tok(completion_prompt(PROMPT, "video7b_fast_enhanced", "fast"), return_tensors="pt").to(model.device)
    res["prompt_tokens"] = int(ids["input_ids"].shape[1])
    n = 16 if ctx.tiny else 200
    kwargs = generation_kwargs(tok)

    def gen(new: int, **kw) -> tuple[float, int]:
        """Seconds and new tokens of one greedy generate with the enhancer's settings."""
        sync()
        t = now()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new, **{**kwargs, **kw})
        sync()
        return now() - t, int(out.shape[1] - ids["input_ids"].shape[1])

    def decode_rate(label: str, repeats: int = 3, **kw) -> dict[str, Any]:
        runs = []
        for _ in range(repeats):
            (t1, _), (tn, got) = gen(1, **kw), gen(n, **kw)
            runs.append(
                {
                    "prefill_s": r(t1),
                    "new_tokens": got,
                    "generate_s": r(tn),
                    "decode_tok_s": r((got - 1) / (tn - t1), 1),
                }
            )
        rates = sorted(x["decode_tok_s"] for x in runs)
        return {"label": label, "runs": runs, "decode_tok_s": rates[len(rates) // 2], "min_tok_s": rates[0]}

    reset_peak()
    res["configured"] = decode_rate("as configured", repeats=5)
    res["configured"].update(peak_gib=gpu_peak_gib(), cache_implementation=model.generation_config.cache_implementation)
    ablations: dict[str, Any] = {}
    if res["prepare"].get("deferred_stop_check"):
        from transformers.generation import utils as gen_utils

        patched = gen_utils.DeferredStopCheck.is_supported
        gen_utils.DeferredStopCheck.is_supported = staticmethod(lambda device, *a, **kw: device.type == "mps")
        try:
            ablations["no_deferred_stop_check"] = decode_rate("stop flag read every token")
        finally:
            gen_utils.DeferredStopCheck.is_supported = patched
    res["ablations"] = ablations
    # eager baseline: dynamic cache, no compile
    m = 8 if ctx.tiny else 40
    t1, _ = gen(1, disable_compile=True, cache_implementation="dynamic")
    tn, got = gen(m, disable_compile=True, cache_implementation="dynamic")
    res["eager_dynamic"] = {"prefill_s": r(t1), "new_tokens": got, "decode_tok_s": r((got - 1) / (tn - t1), 1)}
    res["speedup"] = r(res["configured"]["decode_tok_s"] / res["eager_dynamic"]["decode_tok_s"], 2)
    # the real enhancer call (random weights: the text is gibberish; timing is what counts)
    enhancer = Enhancer(manager, settings)
    res["enhance_calls"] = []
    for i in range(3):
        e = enhancer.enhance(f"{PROMPT} (bench {i})", "video7b_fast_enhanced", "fast")
        res["enhance_calls"].append(
            {
                "seconds": r(e.enhancement_time, 2),
                "new_tokens": e.new_tokens,
                "tok_s_incl_prefill": r(e.new_tokens / e.enhancement_time, 1) if e.new_tokens else None,
                "applied": e.enhancement_applied,
                "reason": e.reason,
            }
        )
    return res  # the model goes with this frame (and the manager that holds it)
