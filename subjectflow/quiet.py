"""Library messages a subjectflow user cannot act on, silenced in one place.

Each filter names one message and why it says nothing to act on; everything else the
libraries log still comes through. Installed when `subjectflow` is imported, before any
of those libraries is.
"""

from __future__ import annotations

import logging
import os
import warnings


class _Drop(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_library_noise() -> None:
    # transformers draws a bar for every weight load and save (the text encoder, each
    # time a model opens); nothing is downloaded at run time, so the hub's bars go too.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torchvision is no dependency of ours: transformers falls back to the PIL image
    # processors, which are the ones the scorers use anyway. Logged on every start.
    logging.getLogger("transformers.utils.import_utils").addFilter(_Drop("requires torchvision (not installed)"))
    # Stacked LoRAs (SFO on its SFT parent, JeDi's) are the design; peft warns on every
    # adapter after the first, and on deleting the active one when a run cleans up.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted", category=UserWarning)
