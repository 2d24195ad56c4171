"""Talking to the Hugging Face hub: a fast reachability probe, and pushing a finished run.

The probe is asked before a model or dataset id is looked up (models/load.py, data/sources.py): an offline
`from_pretrained` spends ~25 s in retries before it fails; tunelab asks once, in about a second, and explains.
`push_folder` is called when a run with push_to_hub finishes (outputs.RunFolder.close_for).
The endpoint is HF_ENDPOINT when set (a private hub or a mirror), else huggingface.co, and both the probe and the
upload use the same one. The token is taken from the params or HF_TOKEN; it goes only into the Authorization
header of the requests, never into a message, a log line or a file.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
# Run folders hold things that are not the model: resumable checkpoints (optimizer state, large) and TensorBoard
# events. The hub repo gets the model, its tokenizer, the card and the run's description.
IGNORED = ["checkpoint-*/**", "runs/**"]


def hub_endpoint() -> str:
    """The hub's base URL: HF_ENDPOINT when set, else https://huggingface.co (no trailing slash)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub endpoint answers a TCP connect (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


# A hub model's files that say what it is (config, tokenizer, a tunelab run's record, PEFT's adapter config),
# without its weights: what a check before training reads.
DESCRIBING_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub model id (owner/name), not a path (./x, ~/x, /x, a/b/c, x/..)."""
    import re

    return bool(re.fullmatch(r"[\w-][\w.-]*/(?!\.+$)[\w.-]+", name))


def hub_snapshot(repo_id: str, weights: bool = True, revision: str | None = None) -> str:
    """A local folder of a hub model's files: downloaded (only DESCRIBING_FILES without `weights`; with them, the
    safetensors weights, else the PyTorch .bin ones: never both, nor other formats), or the cached copy when the
    hub is out of reach; a TunelabError in one line when neither can be had. `revision` pins a commit (the
    folder's name, from an earlier call), so that files checked first and weights loaded later are one version."""
    from huggingface_hub import snapshot_download

    from tunelab.errors import TunelabError

    reachable = hub_reachable()
    try:
        folder = None
        for weight_files in (["*.safetensors"], ["*.bin"]) if weights else ([],):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=DESCRIBING_FILES + weight_files,
                local_files_only=not reachable,
            )
            if not weight_files or any(Path(folder).glob(weight_files[0])):
                break
        return str(folder)
    except Exception as error:
        where = "" if reachable else ": the hub is out of reach and no copy of it is cached"
        why = f" ({type(error).__name__}: {_describe(error)})" if reachable else ""
        raise TunelabError(f"cannot download model {repo_id!r}{where}{why}") from None


def push_folder(folder: str, repo_id: str, token: str | None, private: bool = True) -> str:
    """Upload a finished run folder to a hub model repo (created private unless told otherwise).

    Args:
        folder: the run folder; its checkpoints and TensorBoard events stay behind.
        repo_id: `user/name` or `org/name`.
        token: a write token; HF_TOKEN when None.
        private: visibility of a repo created now (an existing repo keeps its own).

    Returns:
        The repo's URL on the endpoint used.

    Raises:
        TunelabError: no token, the hub out of reach, or the hub refused (the token never quoted).
    """
    from tunelab.errors import TunelabError

    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise TunelabError("push_to_hub needs a token: set --token, hub.token in the config, or HF_TOKEN")
    endpoint = hub_endpoint()
    # Probed again now, not the answer cached when the model or data was looked up hours before.
    if not hub_reachable.__wrapped__():
        raise TunelabError(f"cannot push to {repo_id}: the hub at {endpoint} is out of reach from this machine")
    try:
        # Imported here: huggingface_hub reads HF_ENDPOINT at import; passing the endpoint keeps probe and upload
        # on the same server even when the variable changed after that import.
        from huggingface_hub import HfApi

        from tunelab import __version__

        api = HfApi(endpoint=endpoint, token=token, library_name="tunelab", library_version=__version__)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder, repo_id=repo_id, commit_message="Upload a tunelab run", ignore_patterns=IGNORED
        )
    except Exception as err:  # the hub's errors can quote the request; never let the token through
        message = _describe(err).replace(token, "***")[:300]
        raise TunelabError(f"push to {repo_id} at {endpoint} failed: {message}") from None
    return f"{endpoint}/{repo_id}"


def _describe(err: Exception) -> str:
    """One line for a failed hub call: the HTTP status and the hub's own message when there is a response."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        return " ".join(str(err).split())
    text = f"{status} {getattr(response, 'reason_phrase', '')}".strip()
    server_message = getattr(err, "server_message", None)
    if server_message:
        text += f": {' '.join(str(server_message).split())}"
    if status in (401, 403):
        text += " (check that the token is valid and may write to this namespace)"
    return text
