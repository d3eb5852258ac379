"""Build script: the Python package plus, when possible, the native objective from ``csrc/``.

Environment flags (read at build time):
- ``FBN_FAST_NO_EXT=1``: build no native extension; the package works through its other backends (the CUDA
  sources are still shipped, so the ``cuda`` backend can compile them at run time through cupy/NVRTC).
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

from build_native import build_py_command, native_build  # noqa: E402  (csrc/build_native.py)

ext_modules: list = []
cmdclass: dict = {}
if os.environ.get("FBN_FAST_NO_EXT", "0") != "1":
    ext_modules, cmdclass = native_build()
# The CUDA sources travel inside the package either way, for run-time compilation (cupy/NVRTC).
cmdclass["build_py"] = build_py_command()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"fbn_fast": ["py.typed"], "fbn_fast.kernels": ["*.py"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
