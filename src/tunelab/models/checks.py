"""What can be known about the base model before its weights load: checked from its config, in the prepare step
of every task (tasks/llm.py, tasks/text_classification.py), so a mismatch is one clear line, not a traceback
after minutes of loading.
"""

from __future__ import annotations

from typing import Any

from tunelab.config.base import RunParams


def check_model(source: Any, params: RunParams, kind: str = "causal_lm") -> None:
    """Raise TunelabError for a setting this model cannot take (kind: "causal_lm", "reward" or "classifier")."""
