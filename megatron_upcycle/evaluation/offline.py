"""Nothing reaches a hub: the switches ``datasets``, ``huggingface_hub``, ``transformers``
and ``evaluate`` read, set before any of them is imported (they read them at import)."""
from __future__ import annotations

import os
import sys

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def go_offline() -> None:
    os.environ.update(OFFLINE_ENV)
    # Imported already (by a caller in this process): flip their module-level flags too.
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
