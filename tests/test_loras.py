"""LoRAs per job: real LoRA files for the tiny transformer, run through the worker's real paths.

The files are written in the three layouts diffusers' Wan loader converts (diffusers/PEFT,
ComfyUI/Kijai with ``alpha``, musubi), with non-zero up-projections so they change output.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanTransformer3DModel
from helpers.inprocess import handle, png_data_uri, tiny_settings, tiny_worker
from helpers.workers import ApiWorker, start_api_worker, stop, worker_env
from safetensors.torch import save_file

from wan_worker.contract.jobs import LoraRequest, build_job
from wan_worker.contract.schema import parse_job_input
from wan_worker.runtime.accel import transformer_dummy_inputs
from wan_worker.runtime.loras import LoraRuntime, add_slots, slots_active
from wan_worker.runtime.models import ModelManager
from wan_worker.runtime.tiny import T2V_DIR

#: The tiny transformer (wan_worker.runtime.tiny): width 24, feed-forward 32, text 32, two blocks.
WIDTH, FFN, BLOCKS = 24, 32, 2
JOB = {
    "job_type": "image_fast",
    "prompt": "a lighthouse at dusk",
    "width": 256,
    "height": 256,
    "seed": 7,
    "config": {"num_inference_steps": 1},
}


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.5


def write_peft(path: Path, seed: int = 1, rank: int = 4, fan_in: int = WIDTH) -> None:
    """diffusers/PEFT keys: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (r, in), ``lora_B`` (out, r)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(BLOCKS):
        for module, (n_in, n_out) in {
            "attn1.to_q": (fan_in, WIDTH),
            "attn1.to_v": (WIDTH, WIDTH),
            "ffn.net.0.proj": (WIDTH, FFN),
        }.items():
            tensors[f"transformer.blocks.{i}.{module}.lora_A.weight"] = _rand(g, rank, n_in)
            tensors[f"transformer.blocks.{i}.{module}.lora_B.weight"] = _rand(g, n_out, rank)
    save_file(tensors, str(path))


def write_kijai(path: Path, seed: int = 2, rank: int = 8) -> None:
    """ComfyUI/Kijai keys: ``diffusion_model.blocks.N.self_attn.q.lora_down/lora_up.weight`` + ``alpha``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(BLOCKS):
        for module, (n_in, n_out) in {"self_attn.q": (WIDTH, WIDTH), "self_attn.o": (WIDTH, WIDTH)}.items():
            base = f"diffusion_model.blocks.{i}.{module}"
            tensors[f"{base}.lora_down.weight"] = _rand(g, rank, n_in)
            tensors[f"{base}.lora_up.weight"] = _rand(g, n_out, rank)
            tensors[f"{base}.alpha"] = torch.tensor(float(rank) / 2)
        tensors[f"diffusion_model.blocks.{i}.ffn.0.lora_down.weight"] = _rand(g, rank, WIDTH)
        tensors[f"diffusion_model.blocks.{i}.ffn.0.lora_up.weight"] = _rand(g, FFN, rank)
    save_file(tensors, str(path))


def write_musubi(path: Path, seed: int = 3, rank: int = 2) -> None:
    """musubi-tuner keys: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` + ``alpha``, every layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {f"{a}_{o}": (WIDTH, WIDTH) for a in ("self_attn", "cross_attn") for o in "qkvo"}
    layers |= {"ffn_0": (WIDTH, FFN), "ffn_2": (FFN, WIDTH)}
    tensors = {}
    for i in range(BLOCKS):
        for module, (n_in, n_out) in layers.items():
            base = f"lora_unet_blocks_{i}_{module}"
            tensors[f"{base}.lora_down.weight"] = _rand(g, rank, n_in)
            tensors[f"{base}.lora_up.weight"] = _rand(g, n_out, rank)
            tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    write_peft(root / "ink-style.safetensors")
    write_kijai(root / "kijai-detail.safetensors")
    write_musubi(root / "musubi-grain.safetensors")
    write_peft(root / "turbo.safetensors", seed=4)
    (root / "turbo.json").write_text(json.dumps({"steps": 3, "guidance_scale": 1.0, "flow_shift": 8.0}))
    write_peft(root / "dmd.safetensors", seed=5)
    (root / "dmd.json").write_text(json.dumps({"steps": 4, "sampler": "dmd"}))
    write_peft(root / "bad-sidecar.safetensors", seed=6)
    (root / "bad-sidecar.json").write_text(json.dumps({"steps": 0, "colour": "red"}))
    write_peft(root / "wrong-shape.safetensors", seed=7, fan_in=16)  # the tiny model's layers take 24
    write_peft(root / "too-big.safetensors", seed=8, rank=32)  # over MAX_LORA_RANK=16 below
    (root / "notes.safetensors").write_text("this is not a safetensors file")
    (root / "truncated.safetensors").write_bytes((root / "ink-style.safetensors").read_bytes()[:100])
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    write_peft(outside)
    (root / "escape.safetensors").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def lora_worker(tiny_models, lora_dir, tmp_path_factory):
    """A worker process serving /runsync, with LORA_DIR set and no bucket (results come inline)."""
    env = worker_env(tiny_models, LORA_DIR=str(lora_dir), MAX_LORA_RANK="16")
    worker = start_api_worker(env, tmp_path_factory.mktemp("lora-api") / "worker.log")
    yield worker
    stop(worker.proc)


def image_bytes(result: dict) -> bytes:
    """The PNG itself (inline data URI), compared byte for byte."""
    url = result["assets"][0]["url"]
    assert url.startswith("data:image/png;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def generate(worker: ApiWorker, **extra) -> dict:
    out = worker.runsync({**JOB, **extra})
    assert out["status"] == "COMPLETED", out
    return out["output"]


def failure(worker: ApiWorker, job: dict) -> str:
    out = worker.runsync(job)
    assert out["status"] == "FAILED", out
    return out["error"]


@pytest.fixture(scope="module")
def baseline(lora_worker) -> bytes:
    """The first job on a fresh worker, without LoRAs."""
    result = generate(lora_worker)
    assert result["assets"][0]["metadata"]["loras_applied"] == []
    assert "lora_switch" not in result["metadata"]["timings"]
    return image_bytes(result)


def test_list_loras_reads_headers(lora_worker, lora_dir):
    out = lora_worker.runsync({"action": "list_loras"})
    assert out["status"] == "COMPLETED", out
    listed = {e["name"]: e for e in out["output"]["loras"]}
    assert listed["ink-style"] == {
        "name": "ink-style",
        "size_bytes": (lora_dir / "ink-style.safetensors").stat().st_size,
        "format": "diffusers",
        "rank": 4,
        "targets": ["attn1.to_q", "attn1.to_v", "ffn.net.0.proj"],
        "tensors": 12,
        "defaults": None,
    }
    assert listed["kijai-detail"]["format"] == "comfyui" and listed["kijai-detail"]["rank"] == 8
    assert listed["kijai-detail"]["targets"] == ["ffn.0", "self_attn.o", "self_attn.q"]
    assert listed["musubi-grain"]["format"] == "musubi" and listed["musubi-grain"]["rank"] == 2
    assert "self_attn_q" in listed["musubi-grain"]["targets"]
    assert listed["turbo"]["defaults"] == {"steps": 3, "guidance_scale": 1.0, "flow_shift": 8.0}
    assert "unreadable" in listed["notes"]["error"] and "unreadable" in listed["truncated"]["error"]
    assert "outside LORA_DIR" in listed["escape"]["error"]
    assert "bad sidecar" in listed["bad-sidecar"]["error"]


def test_lora_changes_output_and_leaves_nothing_behind(lora_worker, lora_dir, baseline):
    ink = generate(lora_worker, loras=[{"name": "ink-style", "scale": 0.8}])
    (applied,) = ink["assets"][0]["metadata"]["loras_applied"]
    sha = hashlib.sha256((lora_dir / "ink-style.safetensors").read_bytes()).hexdigest()
    assert applied == {"name": "ink-style", "scale": 0.8, "sha256": sha}
    assert ink["metadata"]["timings"]["lora_switch"] >= 0
    ink_png = image_bytes(ink)
    assert ink_png != baseline

    assert image_bytes(generate(lora_worker)) == baseline  # disabled after the job: bit-identical

    scaled = generate(lora_worker, config={**JOB["config"], "loras": [{"name": "ink-style", "scale": -1.5}]})
    assert scaled["assets"][0]["metadata"]["loras_applied"][0]["scale"] == -1.5
    assert image_bytes(scaled) not in (baseline, ink_png)

    kijai_png = image_bytes(generate(lora_worker, loras=[{"name": "kijai-detail"}]))
    both = generate(lora_worker, loras=[{"name": "kijai-detail"}, {"name": "ink-style", "scale": 0.8}])
    assert [a["name"] for a in both["assets"][0]["metadata"]["loras_applied"]] == ["kijai-detail", "ink-style"]
    assert len({baseline, ink_png, kijai_png, image_bytes(both)}) == 4

    # the same LoRA again (now cached, and still in its slot) gives the same picture
    assert image_bytes(generate(lora_worker, loras=[{"name": "ink-style", "scale": 0.8}])) == ink_png
    assert image_bytes(generate(lora_worker, loras=[{"name": "musubi-grain"}])) != baseline
    assert image_bytes(generate(lora_worker)) == baseline


def test_sidecar_defaults_apply_and_job_overrides_win(lora_worker):
    job = {**JOB, "config": {}, "loras": [{"name": "turbo"}]}
    meta = lora_worker.runsync(job)["output"]["metadata"]
    assert (meta["steps"], meta["guidance_scale"], meta["flow_shift"], meta["sampler"]) == (3, 1.0, 8.0, "unipc")
    assert meta["sampling_sources"] == {
        "steps": "lora:turbo",
        "guidance_scale": "lora:turbo",
        "flow_shift": "lora:turbo",
        "sampler": "default",
    }
    meta = generate(lora_worker, config={"num_inference_steps": 2, "guidance_scale": 3.0}, loras=[{"name": "turbo"}])[
        "metadata"
    ]
    assert (meta["steps"], meta["guidance_scale"], meta["flow_shift"]) == (2, 3.0, 8.0)
    assert meta["sampling_sources"]["steps"] == "config.num_inference_steps"
    assert meta["sampling_sources"]["guidance_scale"] == "config.guidance_scale"
    assert meta["sampling_sources"]["flow_shift"] == "lora:turbo"


def test_distillation_sidecar_runs_the_dmd_sampler(lora_worker):
    """A sidecar with ``sampler: dmd`` runs the base model on evenly spaced distilled timesteps."""
    meta = generate(lora_worker, config={}, loras=[{"name": "dmd"}])["metadata"]
    assert (meta["sampler"], meta["steps"], meta["timesteps"]) == ("dmd", 4, [1000, 750, 500, 250])
    assert meta["sampling_sources"]["sampler"] == meta["sampling_sources"]["steps"] == "lora:dmd"


def test_lora_applies_to_the_vace_transformer(lora_worker):
    """A reference job runs on the VACE transformer, which has its own slots."""
    job = {
        "job_type": "video_fast",
        "prompt": "a red ball rolling",
        "width": 256,
        "height": 256,
        "frame_num": 1,  # one frame is enough to run the VACE transformer; the video is still an MP4
        "seed": 4,
        "reference_image_url": png_data_uri(),
        "config": {"num_inference_steps": 1},
    }

    def video(**extra) -> tuple[bytes, dict]:
        out = lora_worker.runsync({**job, **extra})
        assert out["status"] == "COMPLETED", out
        asset = out["output"]["assets"][0]
        assert asset["metadata"]["pipeline"] == "vace" and asset["url"].startswith("data:video/mp4;base64,")
        return base64.b64decode(asset["url"].split(",", 1)[1]), asset["metadata"]

    plain, _ = video()
    styled, meta = video(loras=[{"name": "kijai-detail", "scale": 1.2}])
    assert meta["loras_applied"][0]["name"] == "kijai-detail"
    assert styled != plain
    assert video()[0] == plain


BAD_INPUTS = [
    ([{"name": "nope"}], "loras[0].name", "no LoRA named 'nope'"),
    ([{"name": "../ink-style"}], "loras[0].name", "plain file stem"),
    ([{"name": "sub/ink-style"}], "loras[0].name", "plain file stem"),
    ([{"name": "escape"}], "loras[0].name", "outside LORA_DIR"),
    ([{"name": "ink-style"}, {"name": "notes"}], "loras[1].name", "not a readable LoRA safetensors file"),
    ([{"name": "truncated"}], "loras[0].name", "not a readable LoRA safetensors file"),
    (
        [{"name": "ink-style"}] * 1 + [{"name": "kijai-detail"}, {"name": "turbo"}, {"name": "dmd"}],
        "loras",
        "at most 3",
    ),
    ([{"name": "ink-style", "scale": 2.5}], "loras[0].scale", "less than or equal to 2"),
    ([{"name": "ink-style", "scale": "1"}], "loras[0].scale", "valid number"),
    ([{"name": "ink-style", "url": "https://example.com/x"}], "loras[0].url", "Extra inputs"),
    ([{"name": "ink-style"}, {"name": "ink-style", "scale": 0.5}], "loras[1].name", "listed twice"),
    ([{"name": "bad-sidecar"}], "loras[0].name", "bad sidecar bad-sidecar.json"),
]


@pytest.mark.parametrize(
    ("loras", "field", "message"), BAD_INPUTS, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD_INPUTS)]
)
def test_bad_lora_input_names_the_field(tiny_models, lora_dir, loras, field, message):
    """Refused before any model loads: ``invalid_input`` naming the field, in-process."""
    worker = tiny_worker(tiny_models, lora_dir=lora_dir)
    out = handle(worker, {**JOB, "loras": loras})
    assert out["error_code"] == "invalid_input", out
    assert out["field"] == field and message in out["error"], out
    assert not worker.manager.wan_loaded


def test_config_loras_errors_name_config(tiny_models, lora_dir):
    worker = tiny_worker(tiny_models, lora_dir=lora_dir)
    out = handle(worker, {**JOB, "config": {"loras": [{"name": "x"}, {"name": "a\\b"}]}})
    assert out["field"] == "config.loras[1].name", out


def test_bad_loras_through_the_api_and_the_worker_keeps_serving(lora_worker, baseline):
    for loras, field, message in BAD_INPUTS:
        error = failure(lora_worker, {**JOB, "loras": loras})
        assert field in error and message in error, (loras, error)
    # these two are found only against the loaded transformer; the slot is emptied again
    error = failure(lora_worker, {**JOB, "loras": [{"name": "ink-style"}, {"name": "wrong-shape"}]})
    assert "loras[1].name" in error and "shape mismatch at blocks.0.attn1.to_q" in error, error
    error = failure(lora_worker, {**JOB, "loras": [{"name": "too-big"}]})
    assert "loras[0].name" in error and "exceeds MAX_LORA_RANK=16" in error, error
    assert image_bytes(generate(lora_worker)) == baseline
    health = lora_worker.runsync({"action": "health"})
    assert health["status"] == "COMPLETED" and health["output"]["status"] == "healthy"


def test_hot_swap_keeps_the_compiled_graph(tiny_models, lora_dir):
    """The blocks compiled as accel.compile_blocks does (``fullgraph=True``, here with a backend
    that counts graphs): swapping files and scales compiles nothing new, and switching LoRAs
    off returns exactly the output from before any LoRA was on."""
    settings = tiny_settings(tiny_models, lora_dir=lora_dir, max_lora_rank=16)
    transformer = WanTransformer3DModel.from_pretrained(
        tiny_models / T2V_DIR, subfolder="transformer", dtype=torch.bfloat16
    )
    add_slots(transformer, settings.max_loras_per_job, settings.max_lora_rank)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for module in transformer.modules():
        if type(module).__name__ in transformer._repeated_blocks:
            module.forward = torch.compile(module.forward, backend=counting_backend, fullgraph=True, dynamic=False)
    runtime = LoraRuntime(ModelManager(settings), settings)
    inputs = transformer_dummy_inputs(transformer, 64, 64, 5, "cpu", text_len=16)

    def forward(*loras: tuple[str, float]) -> torch.Tensor:
        job = SimpleNamespace(loras=tuple(LoraRequest(n, s, f"loras[{i}]") for i, (n, s) in enumerate(loras)))
        with runtime.applied(transformer, job), torch.inference_mode():
            return transformer(**inputs)[0]

    plain = forward()
    with slots_active(transformer, 1), torch.inference_mode():  # what the warm-up does
        assert torch.equal(transformer(**inputs)[0], plain)  # empty slots change nothing
    one_slot = len(graphs)
    ink = forward(("ink-style", 0.5))
    assert len(graphs) == one_slot  # the warm-up compiled the graph of a one-LoRA job
    kijai = forward(("kijai-detail", -1.0))
    ink_stronger = forward(("ink-style", 1.5))
    assert len(graphs) == one_slot  # new file, new scale: same graph
    assert not torch.equal(ink, kijai) and not torch.equal(ink, ink_stronger) and not torch.equal(ink, plain)
    assert torch.equal(forward(), plain)
    forward(("ink-style", 0.5), ("kijai-detail", 1.0))
    two_slots = len(graphs)
    forward(("kijai-detail", 0.3), ("ink-style", 1.0))
    assert len(graphs) == two_slots
    assert torch.equal(forward(("ink-style", 0.5)), ink)  # back in slot 0 after other contents
    assert len(graphs) == two_slots


def test_cache_is_lru_bounded_and_counted_in_the_budget(tiny_models, lora_dir):
    def job(name: str):
        return build_job(parse_job_input({**JOB, "loras": [{"name": name}]}), job_id="j")

    def runtime_with(cache_gb: float) -> LoraRuntime:
        settings = tiny_settings(tiny_models, lora_dir=lora_dir, lora_cache_gb=cache_gb)
        return LoraRuntime(ModelManager(settings), settings)

    probe = runtime_with(1.0)
    sizes = {}
    for name in ("ink-style", "turbo", "wrong-shape"):
        before = probe.cache_bytes()
        probe.prepare(job(name))
        sizes[name] = probe.cache_bytes() - before
    assert sizes["ink-style"] == sizes["turbo"] > sizes["wrong-shape"] > 0

    limit = sizes["ink-style"] * 2  # room for two full-width PEFT files
    runtime = runtime_with(limit / 1024**3)
    runtime.prepare(job("ink-style"))
    runtime.prepare(job("turbo"))
    runtime.prepare(job("ink-style"))  # used again: now the most recent
    runtime.prepare(job("wrong-shape"))  # over the limit: the least recently used (turbo) goes
    assert [Path(key[0]).stem for key in runtime._cache] == ["ink-style", "wrong-shape"]
    assert runtime.cache_bytes() <= limit
    report = runtime.manager.memory_report()
    assert report["accounted_gib"]["lora_cache"] == round(runtime.cache_bytes() / 1024**3, 3)
    assert runtime.manager.resident_bytes() == runtime.cache_bytes()  # no model loaded: the cache is all it holds


def test_turbo_job_ignores_sidecar_sampling_defaults(tmp_path):
    """Turbo's distilled schedule is fixed: a DMD sidecar's steps and timesteps don't reach it."""
    from wan_worker.runtime.loras import LoraDefaults, LoraFile, _apply_defaults

    job = build_job(parse_job_input({"prompt": "a fox", "quality": "turbo", "loras": [{"name": "dmd"}]}), "t")
    before = (job.steps, job.timesteps, job.sampler, job.flow_shift, dict(job.sampling_sources))
    sidecar = LoraDefaults(steps=2, sampler="dmd", timesteps=[900, 400], flow_shift=3.0)
    _apply_defaults(job, [LoraFile(job.loras[0], tmp_path / "dmd.safetensors", "0" * 64, sidecar, ("dmd", 0, 0))])
    assert (job.steps, job.timesteps, job.sampler, job.flow_shift, job.sampling_sources) == before
