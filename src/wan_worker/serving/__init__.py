"""The entry: ``worker`` (the RunPod handler), ``flow`` (the numbered stages in order),
``result`` (the typed output), ``long_video`` and ``actions``.

Imports every layer below; nothing but ``handler.py`` and the tools import it."""
