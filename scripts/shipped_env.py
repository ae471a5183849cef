"""Build, on the benchmark machine, a Python environment that holds the image's packages only.

The lent GPU machine's Python carries many packages the image doesn't (scikit-learn, pandas,
SciPy, torchvision, JAX, ...). transformers imports several of them whenever they are
installed, so a cold start timed there imports more than the image does. This links the
image's resolved package set (the output of ``scripts/check_image_deps.sh``) from the given
site-packages folders into a fresh venv without system packages, and reports each package
that is missing or has another version there.

Like pip in the image's build, it compiles each linked package's bytecode (the lent machine's
Python may have been installed without it, and then every import compiles its source again).

usage: python3 scripts/shipped_env.py PINS VENV SITE_DIR...   (first SITE_DIR that has a package wins)
prints a JSON report; the venv's interpreter is VENV/bin/python3
"""

from __future__ import annotations

import compileall
import json
import os
import re
import sys
import sysconfig
import venv
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dists(site: Path) -> dict[str, tuple[str, Path]]:
    """Normalized name -> (version, dist-info folder) for one site-packages folder."""
    found: dict[str, tuple[str, Path]] = {}
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        if not meta.is_file():
            continue
        fields = dict(
            line.split(": ", 1) for line in meta.read_text(errors="replace").splitlines()[:40] if ": " in line
        )
        if "Name" in fields and "Version" in fields:
            found.setdefault(normalize(fields["Name"]), (fields["Version"].strip(), info))
    return found


def top_levels(info: Path) -> set[str]:
    """The top-level files and folders a distribution installed, from its RECORD."""
    record = info / "RECORD"
    tops = {info.name}
    if record.is_file():
        for line in record.read_text(errors="replace").splitlines():
            top = line.split(",", 1)[0].split("/", 1)[0]
            if top and not top.startswith("..") and top != "__pycache__":
                tops.add(top)
    return tops


def main(pins_file: str, target_venv: str, *sites: str) -> dict:
    pins = {}
    for line in Path(pins_file).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[normalize(name)] = version
    venv.create(target_venv, with_pip=False, symlinks=True, clear=True)
    target = Path(
        sysconfig.get_path(
            "purelib", vars={"base": target_venv, "platbase": target_venv, "installed_base": target_venv}
        )
    )
    indexes = [(Path(site).resolve(), dists(Path(site).resolve())) for site in sites]
    report: dict = {"venv": target_venv, "site_packages": str(target), "linked": 0, "missing": [], "other_version": {}}
    sources: list[Path] = []
    for name, version in sorted(pins.items()):
        hit = next(((site, index[name]) for site, index in indexes if name in index), None)
        if hit is None:
            report["missing"].append(f"{name}=={version}")
            continue
        site, (found, info) = hit
        if found != version:
            report["other_version"][name] = {"image": version, "here": found}
        for top in top_levels(info):
            source, link = site / top, target / top
            if source.exists() and not link.is_symlink() and not link.exists():
                link.symlink_to(source)
                sources.append(source)
        report["linked"] += 1
    workers = os.cpu_count() or 1
    compiled = [  # every package, even after one with a file that doesn't compile
        compileall.compile_dir(str(p), quiet=2, workers=workers)
        if p.is_dir()
        else compileall.compile_file(str(p), quiet=2)
        for p in sources
        if p.is_dir() or p.suffix == ".py"
    ]
    report["bytecode_all_compiled"] = all(compiled)
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:]), indent=1))
