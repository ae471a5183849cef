"""Servers and helpers the tests share; ``tests/conftest.py`` holds only the pytest fixtures.

Everything runs for real on loopback: the worker through the RunPod SDK's entry points
(``workers``), in-process workers on the tiny profile (``inprocess``), a signed callback
receiver (``callbacks``), a fault-injecting S3 proxy (``faultproxy``), a reference-image
server (``refserver``), media probes (``mediacheck``) and a loopback-only network namespace
(``netns``).
"""
