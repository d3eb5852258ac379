"""Build description of the native objective, used by ``setup.py``: ``native_build() -> (ext_modules, cmdclass)``.

Two extension modules, each optional:
- ``fbn_fast._native`` (CPU): ``objective_cpu.cpp`` + ``bind_cpu.cpp``, ``-O3``, OpenMP when the compiler has it.
- ``fbn_fast._native_cuda`` (CUDA): ``objective_cuda.cu`` compiled by ``nvcc`` to an object, linked with the CUDA
  runtime into ``bind_cuda.cpp``.
Both bind raw addresses through pybind11 and do not use torch's C++ API: no torch headers, no rebuild per torch.

Environment flags:
- ``FBN_FAST_CUDA=1`` / ``0``: force the CUDA part on / off. Default: on when ``nvcc``, the CUDA runtime library
  and a CUDA driver (``libcuda``, i.e. a machine that can run it) are all present.
- ``FBN_FAST_CUDA_ARCH``: ``;``-separated compute capabilities for the CUDA part (default ``80;90``; the last one
  also embeds PTX so newer GPUs can JIT it).
- ``FBN_FAST_REQUIRE_EXT=1``: a failing native build is an error (default: report it and go on without it).
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPU_SOURCES = ("objective_cpu.cpp", "bind_cpu.cpp")
CUDA_SOURCE = "objective_cuda.cu"
CUDA_BINDING = "bind_cuda.cpp"
SHIPPED_SOURCES = ("objective_cuda.cu", "objective_math.h")
DEFAULT_CUDA_ARCHS = "80;90"
CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-Wno-psabi"]


def _log(msg: str) -> None:
    print(f"[fbn_fast native] {msg}", file=sys.stderr, flush=True)


def _rel(name: str) -> str:
    # setuptools wants source paths relative to the project root.
    return os.path.relpath(os.path.join(HERE, name), ROOT)


def find_nvcc() -> str | None:
    """``nvcc`` from ``CUDA_HOME``/``CUDA_PATH`` or ``PATH``."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> str:
    """The toolkit directory of ``nvcc``, seeing through wrapper scripts that ``exec`` the real one."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(512)
        if head.startswith(b"#!"):
            for tok in head.decode(errors="ignore").split():
                if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                    real = os.path.realpath(tok)
                    break
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def _cuda_lib_dir(home: str) -> str | None:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")) or os.path.isfile(os.path.join(d, "libcudart.so")):
            return d
    return None


def cuda_archs() -> list[str]:
    raw = os.environ.get("FBN_FAST_CUDA_ARCH", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"FBN_FAST_CUDA_ARCH: expected ';'-separated compute capabilities like '80;90', got {raw!r}")
    return archs


def nvcc_command(nvcc: str, source: str, output: str, archs: list[str], extra: list[str] | None = None) -> list[str]:
    """The ``nvcc`` line that compiles ``source`` into the object file ``output`` (also used by the tests)."""
    cmd = [nvcc, "-c", source, "-o", output, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I", HERE,
           "--threads", "0"]
    for i, arch in enumerate(archs):
        code = f"[sm_{arch},compute_{arch}]" if i == len(archs) - 1 else f"sm_{arch}"
        cmd += ["-gencode", f"arch=compute_{arch},code={code}"]
    return cmd + list(extra or [])


def cuda_plan() -> tuple[bool, str]:
    """Whether to build the CUDA part, and why (or why not)."""
    flag = os.environ.get("FBN_FAST_CUDA")
    nvcc = find_nvcc()
    if flag == "0":
        return False, "FBN_FAST_CUDA=0"
    if nvcc is None:
        return (False, "FBN_FAST_CUDA=1 but nvcc was not found") if flag == "1" else (False, "no nvcc")
    if _cuda_lib_dir(cuda_home(nvcc)) is None:
        return False, f"no CUDA runtime library under {cuda_home(nvcc)}"
    if flag == "1":
        return True, "FBN_FAST_CUDA=1"
    if ctypes.util.find_library("cuda") is None:
        return False, "no CUDA driver on this machine (set FBN_FAST_CUDA=1 to build anyway)"
    return True, "nvcc, CUDA runtime and driver found"


def build_py_command():
    """A ``build_py`` that also ships the CUDA sources inside the package (``fbn_fast/_csrc``), with or without
    the extension, so that the ``cuda`` backend can compile them at run time through cupy/NVRTC."""
    from setuptools.command.build_py import build_py

    class BuildPyWithSources(build_py):
        def run(self) -> None:
            super().run()
            for src, dst in self._shipped():
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)

        def get_outputs(self, include_bytecode: bool = True) -> list[str]:
            return super().get_outputs(include_bytecode) + [dst for _, dst in self._shipped()]

        def _shipped(self) -> list[tuple[str, str]]:
            if getattr(self, "editable_mode", False):  # an editable install keeps csrc/ next to the package
                return []
            return [(os.path.join(HERE, n), os.path.join(self.build_lib, "fbn_fast", "_csrc", n))
                    for n in SHIPPED_SOURCES]

    return BuildPyWithSources


def native_build():
    """``(ext_modules, cmdclass)`` for ``setup()``; empty when pybind11 is missing (and not required)."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    require = os.environ.get("FBN_FAST_REQUIRE_EXT", "0") == "1"
    try:
        import pybind11
    except ImportError:
        if require:
            raise
        _log("pybind11 is not installed: building without the native objective")
        return [], {}
    includes = [HERE, pybind11.get_include()]
    exts = [Extension("fbn_fast._native", [_rel(s) for s in CPU_SOURCES], include_dirs=includes, language="c++",
                      depends=[_rel("objective_math.h"), _rel("objective_cpu.h")])]
    with_cuda, why = cuda_plan()
    _log(f"CUDA part: {'yes' if with_cuda else 'no'} ({why})")
    if require and os.environ.get("FBN_FAST_CUDA") == "1" and not with_cuda:
        raise RuntimeError(f"FBN_FAST_REQUIRE_EXT=1 and FBN_FAST_CUDA=1, but the CUDA part cannot be built: {why}")
    if with_cuda:
        exts.append(Extension("fbn_fast._native_cuda", [_rel(CUDA_BINDING)], include_dirs=includes, language="c++",
                              depends=[_rel(CUDA_SOURCE), _rel("objective_math.h"), _rel("objective_cuda.h")]))

    class BuildNative(build_ext):
        """Adds OpenMP where it compiles, runs nvcc for the CUDA part and skips what fails to build."""

        def build_extensions(self) -> None:
            failed = []
            for ext in list(self.extensions):
                t0 = time.perf_counter()
                try:
                    self._prepare(ext)
                    self.build_extension(ext)
                except Exception as exc:  # a compiler error, a missing tool: report, skip unless required
                    if require:
                        raise
                    _log(f"{ext.name} not built ({type(exc).__name__}: {exc}); the package works without it")
                    failed.append(ext)
                else:
                    _log(f"built {ext.name} in {time.perf_counter() - t0:.1f} s")
            for ext in failed:
                self.extensions.remove(ext)

        def _prepare(self, ext) -> None:
            args, link = list(CXX_FLAGS), []
            if ext.name == "fbn_fast._native" and self._has_openmp():
                args.append("-fopenmp")
                link.append("-fopenmp")
            if ext.name == "fbn_fast._native_cuda":
                link += self._nvcc_object(ext)
            ext.extra_compile_args = args
            ext.extra_link_args = link

        def _has_openmp(self) -> bool:
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "omp_probe.cpp")
                with open(src, "w") as f:
                    f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
                try:
                    self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                    return True
                except Exception:
                    _log("the C++ compiler has no OpenMP: the CPU objective runs on std::thread")
                    return False

        def _nvcc_object(self, ext) -> list[str]:
            import subprocess

            nvcc = find_nvcc()
            home = cuda_home(nvcc)
            os.makedirs(self.build_temp, exist_ok=True)
            obj = os.path.join(self.build_temp, "objective_cuda.o")
            t0 = time.perf_counter()
            subprocess.run(nvcc_command(nvcc, os.path.join(HERE, CUDA_SOURCE), obj, cuda_archs()), check=True)
            _log(f"nvcc {CUDA_SOURCE} ({', '.join(cuda_archs())}) in {time.perf_counter() - t0:.1f} s")
            ext.extra_objects = [obj]
            libdir = _cuda_lib_dir(home)
            if os.path.isfile(os.path.join(libdir, "libcudart_static.a")):
                return [os.path.join(libdir, "libcudart_static.a"), "-lrt", "-lpthread", "-ldl"]
            return [f"-L{libdir}", "-lcudart", f"-Wl,-rpath,{libdir}"]

    return exts, {"build_ext": BuildNative}
