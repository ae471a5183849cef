"""One pinned GPU stack: the Dockerfile, requirements-gpu.txt and docs/PERFORMANCE.md's
"Stack" line name the same versions, and the benchmark says whether it ran on them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from wan_worker.runtime import stack

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def performance_stack_line() -> dict[str, str]:
    """``name version`` pairs of the "Stack" paragraph of docs/PERFORMANCE.md."""
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    match = re.search(r"^\*\*Stack \(what the image ships\):\*\* (.+?)\.\s", text, re.MULTILINE | re.DOTALL)
    assert match, 'docs/PERFORMANCE.md has no "**Stack (what the image ships):**" line'
    pairs = {}
    for item in match.group(1).replace("\n", " ").split(","):
        name, _, version = item.strip().rpartition(" ")
        pairs[stack.normalize(name)] = version
    return pairs


def test_requirements_gpu_pins_the_whole_gpu_stack():
    pins = stack.read_pins(stack.GPU_REQUIREMENTS)
    assert set(pins) == {"torch", "triton", "fa3-fwd", "torchao"}
    assert stack.read_directives(stack.GPU_REQUIREMENTS).keys() == {"python", "cuda"}
    runtime = stack.read_pins(stack.REQUIREMENTS)
    assert not set(pins) & set(runtime), "a GPU package is pinned in requirements.txt too"
    for name in stack.RUNTIME_PINNED:
        assert name in runtime, f"requirements.txt does not pin {name}"


def test_dockerfile_installs_exactly_the_pinned_stack():
    text = dockerfile()
    want = stack.read_directives(stack.GPU_REQUIREMENTS)
    base = re.search(r"^FROM\s+nvidia/cuda:(\d+)\.(\d+)\.\d+-(\w+)-ubuntu(\d+\.\d+)", text, re.MULTILINE)
    assert base, "the Dockerfile's base is not an nvidia/cuda image"
    assert f"{base.group(1)}.{base.group(2)}" == want["cuda"], "base image CUDA differs from requirements-gpu.txt"
    assert f"python{want['python']}-venv" in text and f"python{want['python']}-dev" in text
    assert re.search(rf"python{re.escape(want['python'])} -m venv", text)
    assert re.search(r"pip install -r requirements-gpu\.txt -r requirements\.txt", text)
    assert "COPY requirements-gpu.txt" in text
    # no second source of torch: no other pin, no other index
    assert not re.search(r"\btorch(==|>=|~=)", text)
    assert "--index-url" not in text and "--extra-index-url" not in text
    assert "gcc" in text, "Triton needs a C compiler at run time"


def test_performance_stack_line_matches_the_pins():
    shipped = stack.shipped_stack()
    line = performance_stack_line()
    assert line == shipped, f"docs/PERFORMANCE.md says {line}, the pins say {shipped}"


def test_comparison_says_as_shipped_only_on_an_exact_match():
    shipped = stack.shipped_stack()
    same = dict(shipped, torch=shipped["torch"] + "+cu130", python=shipped["python"] + ".3", gpu="NVIDIA H100")
    assert stack.compare(shipped, same) == {"as_shipped": True, "differences": {}}
    assert stack.describe(stack.compare(shipped, same)).startswith("AS SHIPPED")

    other = dict(same, torch="2.13.0+cpu", **{"fa3-fwd": None})
    result = stack.compare(shipped, other)
    assert result["as_shipped"] is False
    assert result["differences"] == {
        "torch": {"shipped": shipped["torch"], "found": "2.13.0+cpu"},
        "fa3-fwd": {"shipped": shipped["fa3-fwd"], "found": None},
    }
    line = stack.describe(result)
    assert line.startswith("NOT AS SHIPPED") and "torch 2.13.0+cpu" in line and "fa3-fwd missing" in line
    # 3.120 is not 3.12
    assert stack.compare({"python": "3.12"}, {"python": "3.120.1"})["as_shipped"] is False


def test_this_cpu_environment_is_reported_not_as_shipped():
    from benchmarks.harness import versions

    record = versions()
    assert record["stack"]["found"]["torch"] == __import__("torch").__version__
    assert record["stack"]["shipped"] == stack.shipped_stack()
    assert record["as_shipped"] is False
    assert "torch" in record["stack"]["differences"] or "fa3-fwd" in record["stack"]["differences"]


@pytest.mark.skipif(os.environ.get("WAN_CHECK_IMAGE_DEPS") != "1", reason="release check: WAN_CHECK_IMAGE_DEPS=1")
def test_image_dependencies_resolve_for_the_image_platform():
    """One to two minutes of package-index metadata reads, so only on demand (a release runs it)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_image_deps.sh")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = dict(line.split("==", 1) for line in proc.stdout.splitlines() if "==" in line)
    resolved = {stack.normalize(k): v for k, v in resolved.items()}
    for name, version in stack.shipped_stack().items():
        if name not in ("python", "cuda"):
            assert resolved.get(name) == version, name


def test_precision_setting_agrees_in_settings_readme_deploy_and_hub():
    import json
    import typing

    from wan_worker.contract.settings import Settings

    field = Settings.model_fields["precision"]
    choices = set(typing.get_args(field.annotation))
    assert field.default == "bf16" and choices == {"bf16", "fp8"}
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    (entry,) = [e for e in hub["config"]["env"] if e["key"] == "PRECISION"]
    assert entry["input"]["default"] == field.default
    assert {o["value"] for o in entry["input"]["options"]} == choices
    readme_row = re.search(r"^\| `PRECISION` \| `(\w+)` \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert readme_row and readme_row.group(1) == field.default
    deploy_row = re.search(
        r"^\| `PRECISION` \| `(\w+)` \(default\) or `(\w+)` \|", (ROOT / "docs" / "DEPLOY.md").read_text(), re.MULTILINE
    )
    assert deploy_row and {deploy_row.group(1), deploy_row.group(2)} == choices and deploy_row.group(1) == field.default
