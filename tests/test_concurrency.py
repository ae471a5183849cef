"""Two jobs at once: the GPU stages take turns, the rest overlaps, and both results are whole."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from helpers.inprocess import SMALL_VIDEO, tiny_worker

from wan_worker.stages.observer import JobObserver


class StageClock(JobObserver):
    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def stage_started(self, name: str) -> None:
        self.started.setdefault(name, time.monotonic())


def test_two_jobs_take_turns_on_the_gpu_and_overlap_the_rest(tiny_models, tmp_path):
    worker = tiny_worker(tiny_models, work_dir=tmp_path)
    worker.handle({"id": "warm", "input": {**SMALL_VIDEO, "frame_num": 1}}, send=lambda _: None)
    clocks = {name: StageClock() for name in ("a", "b")}
    barrier = threading.Barrier(2)

    def run(name: str) -> dict:
        barrier.wait()
        job = {"id": name, "input": {**SMALL_VIDEO, "id": f"job-{name}", "seed": ord(name)}}
        return worker.handle(job, send=lambda _: None, observer=clocks[name])

    with ThreadPoolExecutor(2) as pool:
        outputs = dict(zip("ab", pool.map(run, "ab"), strict=True))

    assert all(out["status"] == "completed" for out in outputs.values()), outputs
    assert outputs["a"]["assets"][0]["url"] != outputs["b"]["assets"][0]["url"]
    # The GPU stages (from "generating" until "encoding" starts) never overlap...
    first, second = sorted("ab", key=lambda n: clocks[n].started["generating"])
    assert clocks[first].started["encoding"] <= clocks[second].started["generating"]
    # ... and the job that came second waited for the GPU, and says so.
    waited = outputs[second]["metadata"]["timings"].get("waiting_for_gpu", 0.0)
    assert waited > 0.0 and "waiting_for_gpu" not in outputs[first]["metadata"]["timings"]


def test_the_sdk_runs_two_requests_at_once(api_worker):
    """The async handler lets the RunPod SDK's local API run both requests concurrently; with a
    synchronous handler the second would wait outside the job and never for the GPU."""
    jobs = [{**SMALL_VIDEO, "id": f"sdk-{i}", "frame_num": 1, "seed": i} for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(api_worker.runsync, jobs))
    outputs = [r["output"] for r in results]
    assert all(out["status"] == "completed" for out in outputs), outputs
    assert sum("waiting_for_gpu" in out["metadata"]["timings"] for out in outputs) == 1
