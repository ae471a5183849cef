"""Run a Python script inside a loopback-only network namespace.

Some outbound checks can only be shown with a server on a public-looking address (a redirect
from a public host to loopback, DNS rebinding). Inside a fresh namespace (``unshare -n``,
needs root) the only interface is ``lo``, which also carries ``PUBLIC``; so the worker's code
really connects to a "public" address, and nothing can leave the machine even if it is wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

#: A public-looking address that, inside the namespace, is local.
PUBLIC = "93.184.216.34"
TESTS = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def available() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "-n", "sh", "-c", f"ip link set lo up && ip addr add {PUBLIC}/32 dev lo"],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def run_isolated(script: str, timeout: float = 120) -> dict:
    """Run ``script`` (cwd ``tests/``) in the namespace; it prints one JSON object last."""
    setup = f'ip link set lo up && ip addr add {PUBLIC}/32 dev lo && exec "$0" -c "$1"'
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", setup, sys.executable, script],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
