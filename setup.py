"""Build script: the Python package plus, when possible, the native objective from ``csrc/``.

Environment flags (read at build time):
- ``FBN_FAST_NO_EXT=1``: build no native extension; the package works through its other backends.
- ``FBN_FAST_CUDA=1`` / ``FBN_FAST_CUDA=0``: force the CUDA part of the extension on or off (default: on
  when ``nvcc`` and a CUDA runtime are found).
A failing native build is reported and skipped unless ``FBN_FAST_REQUIRE_EXT=1``.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))

packages = find_packages(include=["fbn_fast", "fbn_fast.*"]) + ["fbn_fast.kernels"]
package_dir = {"fbn_fast.kernels": "kernels"}

ext_modules: list = []
cmdclass: dict = {}
if os.environ.get("FBN_FAST_NO_EXT", "0") != "1":
    try:
        from build_native import native_build  # csrc/build_native.py: extensions and their build command
    except ImportError:
        native_build = None
    if native_build is not None:
        ext_modules, cmdclass = native_build()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"fbn_fast": ["py.typed"], "fbn_fast.kernels": ["*.py"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
