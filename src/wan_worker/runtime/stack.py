"""The shipped GPU stack: the pins the image installs, and whether this process runs on them.

``requirements-gpu.txt`` is the one source of the GPU pins (torch, triton, fa3-fwd, torchao,
and the Python and CUDA versions in its ``# python:`` / ``# cuda:`` lines); the libraries the
worker is built on (diffusers, transformers, accelerate) are pinned in ``requirements.txt``.
The benchmark records what it ran on (``installed_versions``) and compares it with these pins
(``compare``), so a number measured on another stack is never mistaken for the image's.
"""

from __future__ import annotations

import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
GPU_REQUIREMENTS = ROOT / "requirements-gpu.txt"
REQUIREMENTS = ROOT / "requirements.txt"

#: The runtime libraries whose exact version shapes the GPU numbers, besides the GPU pins.
RUNTIME_PINNED = ("diffusers", "transformers", "accelerate")
#: Every package the stack names, in the order reports list them.
PACKAGES = ("torch", "triton", "fa3-fwd", "torchao", *RUNTIME_PINNED)


def normalize(name: str) -> str:
    """PEP 503 name: ``fa3_fwd`` and ``FA3-Fwd`` are both ``fa3-fwd``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (other specifiers are not pins)."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def read_directives(path: Path) -> dict[str, str]:
    """``# key: value`` comment lines (``python``, ``cuda``) of a requirements file."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        match = re.fullmatch(r"#\s*(python|cuda):\s*(\S+)\s*", raw.strip())
        if match:
            out[match.group(1)] = match.group(2)
    return out


def shipped_stack(gpu_requirements: Path = GPU_REQUIREMENTS, requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """What the image runs: python, cuda, and every package of ``PACKAGES`` with its pin."""
    gpu = read_pins(gpu_requirements)
    runtime = read_pins(requirements)
    stack = dict(read_directives(gpu_requirements))
    for name in PACKAGES:
        version = gpu.get(name) or runtime.get(name)
        if version:
            stack[name] = version
    return stack


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, Any]:
    """What this process runs on: the same keys as ``shipped_stack``, plus the GPU's name."""
    import torch

    found: dict[str, Any] = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for name in PACKAGES:
        found[name] = _package_version(name)
    found["torch"] = torch.__version__
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return found


def _same(key: str, expected: str, found: str | None) -> bool:
    if found is None:
        return False
    if key in ("python", "cuda"):  # pinned as major.minor: 3.12 matches 3.12.3
        return found == expected or found.startswith(expected + ".")
    return found.split("+", 1)[0] == expected  # torch 2.11.0+cu130 is torch 2.11.0


def compare(expected: dict[str, str], found: dict[str, Any]) -> dict[str, Any]:
    """``as_shipped`` is true only when every pinned version matches what was found."""
    differences = {
        key: {"shipped": want, "found": found.get(key)}
        for key, want in expected.items()
        if not _same(key, want, found.get(key))
    }
    return {"as_shipped": not differences, "differences": differences}


def describe(comparison: dict[str, Any]) -> str:
    """One line for a person: "as shipped" or each difference."""
    if comparison["as_shipped"]:
        return "AS SHIPPED: this run used the image's pinned stack"
    parts = [f"{k} {v['found'] or 'missing'} (shipped {v['shipped']})" for k, v in comparison["differences"].items()]
    return "NOT AS SHIPPED: " + ", ".join(parts)
