"""Keep huggingface_hub and datasets from stalling on a network that is not there.

huggingface_hub reads its variables when it is first imported, so the guards run on
`import llamaforge`, before any of them is imported by our modules; they do no network I/O.
"""

from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def apply_network_guards() -> None:
    """On `import llamaforge`, without any network I/O: telemetry off always; datasets offline (llamaforge
    reads data from files and its catalog, never from the hub). Whether the model hub is reachable is
    only asked where a hub id is resolved (`is_offline`). A user's explicit setting wins."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))


_hub_reachable: bool | None = None


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE says so, or when the hub cannot be reached (probed once, when a hub id
    is first resolved: loading then uses the local cache only, with no wait on a missing network)."""
    global _hub_reachable
    if "HF_HUB_OFFLINE" in os.environ:
        return os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes", "on")
    if _hub_reachable is None:
        _hub_reachable = hub_reachable()
    return not _hub_reachable
