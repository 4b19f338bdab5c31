"""Data utilities: the tiny offline FLUX pipeline/dataset builders and the training dataset.

Submodules are imported lazily by their users (``data.tiny_flux``, ``data.dataset``) so that
``import data`` stays cheap and does not pull in torch/diffusers.
"""
