"""Shared pytest setup for msa_cuda.

Tests use the installed ``msa_cuda`` (which carries the compiled ``_C``) when there is one, and
otherwise the source tree (``<repo>/python``, reference paths only). ``MSA_TEST_SOURCE=1``
forces the source tree.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # tests import their small helper modules (gpu_utils) by name
if os.environ.get("MSA_TEST_SOURCE") or importlib.util.find_spec("msa_cuda") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))
