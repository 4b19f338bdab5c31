"""Data utilities: the tiny offline FLUX pipeline/dataset builders and the training dataset.

Submodules are imported lazily by their users (``data.tiny_flux``, ``data.dataset``) so that
``import data`` stays cheap and does not pull in torch/diffusers.
"""
from model.notices import silence_unactionable_notices  # noqa: E402 - logging only, before diffusers is imported

silence_unactionable_notices()
