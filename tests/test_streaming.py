"""A video reaches the MP4 encoder while the VAE is still decoding it, as the same uint8
frames the job reports; a VAE that can't stream falls back to the pipeline's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.inprocess import tiny_worker
from helpers.mediacheck import probe_video

from wan_worker.contract.jobs import build_job
from wan_worker.contract.schema import parse_job_input
from wan_worker.stages.generate import DecodedFrames, build_conditioning
from wan_worker.stages.media import VideoStream
from wan_worker.stages.progress import Progress

JOB = {"job_type": "video_fast", "prompt": "a streaming test", "width": 256, "height": 256, "frame_num": 5, "seed": 5}


@pytest.fixture(scope="module")
def worker(tiny_models):
    worker = tiny_worker(tiny_models)
    worker.generator.load(["t2v"])
    return worker


def generate(worker, sink=None):
    job = build_job(parse_job_input({**JOB, "config": {"num_inference_steps": 1}}), "stream")
    return worker.generator.generate(
        job, job.prompt, build_conditioning(job, "none", {}), Progress(lambda _: None), float("inf"), sink
    )


def test_frames_stream_while_the_vae_decodes(worker, tmp_path):
    decoder = worker.manager.encoder_pipe().vae.decoder
    calls: list[str] = []
    hook = decoder.register_forward_pre_hook(lambda *_: calls.append("decode"))
    chunks: list[np.ndarray] = []

    def sink(chunk: np.ndarray) -> None:
        calls.append("sink")
        chunks.append(chunk)

    try:
        generated = generate(worker, sink)
    finally:
        hook.remove()
    # 5 frames are 2 latent frames: decoded as 1 + 4, each handed on before the next decodes.
    assert calls == ["decode", "sink"] * 2
    assert [len(c) for c in chunks] == [1, 4]
    assert generated.frames.dtype == np.uint8 and generated.frames.shape == (5, 256, 256, 3)
    np.testing.assert_array_equal(np.concatenate(chunks), generated.frames)

    stream = VideoStream(tmp_path / "0.mp4", 16)
    for chunk in chunks:
        stream.append(chunk)
    stream.close()
    assert probe_video((tmp_path / "0.mp4").read_bytes(), tmp_path).frames == 5


def test_a_vae_that_cannot_stream_gives_the_same_frames_at_the_end(worker):
    streamed = generate(worker).frames
    vae = worker.manager.encoder_pipe().vae
    vae.use_tiling = True  # decodes in tiles, not frames: nothing may be handed on early
    try:
        chunks: list[np.ndarray] = []
        at_end = generate(worker, chunks.append).frames
    finally:
        vae.use_tiling = False
    assert len(chunks) == 1 and chunks[0] is not None
    np.testing.assert_array_equal(chunks[0], at_end)
    # The pipeline's own [0, 1] output went through bf16 once more: at most 1 level apart.
    assert np.abs(at_end.astype(np.int16) - streamed.astype(np.int16)).max() <= 1


def test_uint8_conversion_rounds_to_nearest():
    decoded = DecodedFrames(None)
    video = torch.tensor([-1.5, -1.0, -0.002, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7)  # (C, F, H, W)
    decoded._add(video)
    assert decoded.chunks[0].reshape(-1).tolist() == [0, 0, 127, 128, 191, 255, 255]


class FakeCopy:
    """Stands in for the CUDA event recorded after a piece's asynchronous copy to the host."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_pieces_are_handed_on_in_order_once_copied_and_all_at_the_end():
    handed: list[int] = []
    decoded = DecodedFrames(lambda chunk: handed.append(int(chunk[0, 0, 0, 0])))
    copies = [FakeCopy() for _ in range(3)]
    decoded._copying = [(torch.full((1, 1, 1, 3), i, dtype=torch.uint8), c) for i, c in enumerate(copies)]
    copies[1].done = True
    decoded._hand_on(wait=False)
    assert handed == []  # the second piece is on the host, but the first is not: nothing overtakes it
    copies[0].done = True
    decoded._hand_on(wait=False)
    assert handed == [0, 1]  # finished copies pass, in order
    frames = decoded.frames(torch.zeros(0))
    assert handed == [0, 1, 2] and copies[2].waited  # the end waits for the last copy
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_a_failed_encoder_surfaces_at_close(tmp_path):
    stream = VideoStream(tmp_path / "0.mp4", 16)
    stream.append(np.zeros((2, 64, 64, 3), np.uint8))
    stream.append(np.zeros((2, 32, 32, 3), np.uint8))  # a different size: ffmpeg's input breaks
    with pytest.raises(ValueError, match="same size"):
        stream.close()
    stream.abort()  # after a failed close, still safe
