"""Benchmark harness: ``python -m benchmarks`` from the repository root (GPU), or ``--tiny``
(CPU smoke test). It is not part of the installed worker package.

It runs the worker's real job path, stage by stage, on random weights of the real
architectures (random weights cost exactly what trained weights cost per step):

* **write_models** - Wan2.1-T2V-1.3B (full transformer, UMT5-XXL-shaped encoder, default
  VAE), the Wan2.1-VACE-1.3B transformer, the FastWan2.1-T2V-1.3B (turbo) transformer with its
  sparse-attention gate weights, and a Qwen2.5-7B-shaped model, saved with
  ``save_pretrained`` as safetensors under ``MODELS_DIR/<repo name>`` (what ``ModelLocator``
  resolves). ``--tiny`` uses the tiny profile's checkpoints instead.
* **cold_start** (``coldstart``) - a fresh process: imports, ``Worker``, model load from disk
  (page cache dropped first where the OS allows), compile warm-up with the portable compile
  artifacts, until ready; on a GPU also a restart with both compile caches and a restart with
  the artifacts file alone.
* **attention / transformer** - each attention backend, and transformer forwards eager vs
  compiled, with effective TFLOP/s against the analytic FLOP count.
* **vae** - decode in fp32 / bf16 / channels-last / fused norms, time and PSNR vs fp32, and a
  kernel profile of the worker's configuration.
* **reference** - plain diffusers ``WanPipeline``, eager, same weights, prompt and seed.
* **worker** - ``Worker.handle`` end to end (job start to uploaded assets), uncached and with
  the step cache; per-step times, stage times, PSNR of the decoded frames vs the reference
  (uncached) and vs the uncached worker run (cached). The step-cache threshold is process-wide,
  so each ``--cache-thresholds`` value other than the default runs on a warm worker of its own.
* **cpu_stages** - MP4 + thumbnail + upload on the decoded frames and on a natural-looking
  clip, per x264 preset, with the encoded video's PSNR.
* **qwen** - load time from local disk, decode tokens/s as configured, without the deferred stop
  check, and eager with a dynamic cache; the real enhancer call.
* **residency** - a fresh process capped at 48 GB of the card runs all eight job types and
  every reference mode under ``GPU_MEMORY_BUDGET_GB=44``; peak allocated memory per job.
* **scaling** - transformer forward and attention time at 17/33/49/81 frames and 720p.
* **turbo** - ``quality: "turbo"`` on the warm worker: a video and an image end to end, median
  of ``--turbo-runs``, stage times from the job's ``metadata.timings``, and the speed-up over the
  same run's uncached ``video_fast``.
* **turbo_residency** - a fresh process capped like ``residency`` with T2V, VACE, turbo, UMT5
  (and Qwen when written) all loaded; turbo, ``video_fast`` and VACE jobs, peak memory per job.
* **throughput** - ``--throughput-jobs`` back-to-back ``video_fast`` and turbo video jobs through
  one warm ``Worker`` after a warm-up job each: seconds per job, jobs per GPU-hour, the GPU part
  vs the CPU-only tail (encode, upload, report) and the most a second concurrent job could gain.
* **lora** - a warm compiled worker of its own, started with ``LORA_DIR`` holding two rank-32
  LoRAs on every linear of the real layer shapes: first use, a switch between cached LoRAs,
  per-step overhead with vs without a LoRA, and graphs compiled after warm-up.
* **long** - 15 s and 60 s videos (``duration_seconds``, VACE-continued segments) at ``fast``
  (``--long-steps``) and ``turbo``: total, per-segment time, peak VRAM, host RSS growth, and
  whether per-segment time, VRAM and RSS stay flat from 15 s to 60 s.
* **fp8** - the same-seed ``video_fast`` job in bf16 and ``PRECISION=fp8``, each in a fresh
  process: end to end, per forward, warm-up compile time, PSNR of fp8 vs bf16 frames.

A plain ``--tiny`` (CI) leaves out fp8, turbo, throughput, turbo_residency, lora and long; ``--sections``
runs them on the tiny profile too.

``versions`` records the stack the run used (python, torch, CUDA, triton, diffusers,
transformers, fa3-fwd, torchao, the GPU) and ``as_shipped``: whether it is exactly the image's
pinned stack (``requirements-gpu.txt``); the harness prints which at its start and end.

Output is one JSON document (``--out``), rewritten after every section, so an interrupted
run still leaves what it measured. Nothing is asserted on timings here; the numbers are
read by people (docs/PERFORMANCE.md) and compared between runs.

The harness drives the worker only through its injection points: ``Settings`` (and the
environment of the child processes), the ``JobObserver`` and the progress send function given
to ``Worker.handle``. One module per section or group of sections; ``context.Context`` is what
they share, ``__main__`` runs them in order.
"""
