"""Test-only: installs the faults described by $T2I_FAULTS in every Python process that starts with this
folder on PYTHONPATH (see tests/fault_injection.py).  Production code has no fault hooks."""
import os
import sys

if os.environ.get("T2I_FAULTS"):
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if _root not in sys.path:
        sys.path.insert(0, _root)
    from tests.fault_injection import install_from_env

    install_from_env()
