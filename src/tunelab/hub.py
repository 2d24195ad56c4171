"""Talking to the Hugging Face hub: a fast reachability probe, and pushing a finished run.

The probe exists because an offline `from_pretrained` spends ~25 s in retries before it fails; tunelab asks
once, in about a second, and explains. The token is taken from the params or HF_TOKEN and never printed.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub endpoint answers a TCP connect (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def push_folder(folder: str, repo_id: str, token: str | None) -> str:
    """Upload a finished run folder to a private hub model repo; returns the repo URL."""
    from huggingface_hub import HfApi

    from tunelab.errors import TunelabError

    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise TunelabError("push_to_hub needs a token: set --token or HF_TOKEN")
    if not hub_reachable():
        raise TunelabError(f"cannot push to {repo_id}: the Hugging Face hub is out of reach from this machine")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns=["checkpoint-*/**", "runs/**"])
    except Exception as err:  # the hub's errors can quote the request; never let the token through
        raise TunelabError(f"push to {repo_id} failed: {str(err).replace(token, '***')[:300]}") from None
    return f"https://huggingface.co/{repo_id}"
