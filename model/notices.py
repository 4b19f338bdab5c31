"""Third-party start-up notices that nobody can act on, dropped at their source by their exact text.

Only these; every other warning of transformers/diffusers/accelerate still shows.  Kept here, and
called from ``model/__init__.py`` and ``data/__init__.py``, so that every entry point (training and
sampling CLIs, the tiny-asset builder) gets it before any of them imports diffusers.
"""
from __future__ import annotations

import logging

# logger name → text of the notice.  transformers 5 without torchvision (not a requirement; the torchvision
# built for torch 2.13 fails to import beside the CPU build) announces at every process start, once per
# image-processor class that diffusers' pipelines import, that it falls back to the PIL processors — which
# is what this project uses anyway.
UNACTIONABLE_NOTICES = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_unactionable_notices() -> None:
    """Install the filters (idempotent; works before the third-party package is imported)."""
    for name, text in UNACTIONABLE_NOTICES.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in target.filters):
            target.addFilter(_DropNotice(text))
