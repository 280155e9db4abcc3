"""Package build: the Python package plus the optional C++ CPU extension ``vcon_kernels._C``.

The extension (csrc/) is built with torch's ``CppExtension`` when torch is importable at
build time (``pip install --no-build-isolation -e .``, as the Makefile does). It is
optional: without torch or a C++ compiler the package installs anyway, and the CPU ops
fall back to plain torch with one warning at first use. ``VCON_NO_EXTENSION=1`` skips it;
``VCON_REQUIRE_EXTENSION=1`` turns a failed build into an error (CI).

ISA choice: the row kernels (csrc/kernels.h) are compiled twice, for the baseline ISA
and, on x86-64, with ``-mavx2 -mfma -mf16c`` (runtime dispatch in csrc/ops.cpp); the
finalized-layer kernels (csrc/infer_kernels.h) a third time with AVX-512 (csrc/infer.cpp
dispatches). Building the whole extension with ``-mavx2`` (or ``-march=native``) would crash
with SIGILL on a CPU without AVX2 and would tie a wheel to the build machine; AVX-512 gains
nothing for the blend passes (memory-bound: one read and one write of W), but the int4 GEMV
of a finalized layer is compute-bound in AVX2. Every file gets
``-ffp-contract=off``: an FMA rounds ``a * b + c`` once where torch rounds twice, and
the C++ transforms must stay bit-identical to the plain-torch ones.
"""

import os
import platform
import sys

from setuptools import setup

CSRC = "csrc"
BASE_SOURCES = [
    "module.cpp", "ops.cpp", "linear.cpp", "autograd.cpp", "select.cpp", "kernels_default.cpp", "infer.cpp",
    "infer_default.cpp",
]
AVX2_SOURCES = ("kernels_avx2.cpp", "infer_avx2.cpp")
AVX512_SOURCES = ("infer_avx512.cpp",)
COMMON_FLAGS = [
    "-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-DCPU_CAPABILITY=DEFAULT",
]
AVX2_FLAGS = [
    "-UCPU_CAPABILITY", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
    "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
]
# The finalized-layer kernels only (csrc/infer_avx512.cpp): the AVX2 code plus the int4 and 2:4
# GEMVs that are compute-bound on AVX2 (csrc/infer_{q4,nm}_avx512.h). Dispatched at run time.
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


def _say(message: str) -> None:
    print(f"vcon_kernels setup: {message}", file=sys.stderr)


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _extension_setup() -> dict:
    if os.environ.get("VCON_NO_EXTENSION"):
        _say("VCON_NO_EXTENSION is set: building without the C++ extension")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension
        from torch.utils.cpp_extension import CppExtension
    except Exception as exc:  # torch missing (e.g. an isolated build): pure-Python install
        _say(f"torch is not importable ({exc}); building without the C++ extension")
        return {}

    sources = [os.path.join(CSRC, f) for f in BASE_SOURCES]
    flags = list(COMMON_FLAGS)
    per_file = {}
    if _is_x86_64():
        sources.extend(os.path.join(CSRC, f) for f in AVX2_SOURCES + AVX512_SOURCES)
        flags.extend(["-DVCON_HAVE_AVX2", "-DVCON_HAVE_AVX512"])
        per_file.update({f: AVX2_FLAGS for f in AVX2_SOURCES})
        per_file.update({f: AVX512_FLAGS for f in AVX512_SOURCES})
    ext = CppExtension(
        "vcon_kernels._C",
        sources,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
        depends=[os.path.join(CSRC, f) for f in ("vcon.h", "kernels.h", "ops.h", "select.h", "infer.h",
                                                 "infer_kernels.h", "infer_ops.h", "infer_q4_avx512.h",
                                                 "infer_nm_avx512.h")],
    )

    class BuildExt(BuildExtension.with_options(use_ninja=False)):
        """torch's BuildExtension plus per-file ISA flags, and a failed build is not fatal."""

        def build_extension(self, extension):
            compile_one = self.compiler._compile  # torch's wrapper, installed by build_extensions

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = per_file.get(os.path.basename(src))
                if extra:
                    if isinstance(extra_postargs, dict):
                        extra_postargs = {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + extra}
                    else:
                        extra_postargs = list(extra_postargs) + extra
                return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            link_one = self.compiler.link_shared_object

            def _link(objects, *args, **kwargs):
                # setuptools sorts the sources; put the AVX2 object last. The linker keeps the
                # first copy of an inline function that several objects share, and that copy
                # must be a baseline one (tests/test_cpp_backend.py checks the binary).
                objects = sorted(objects, key=lambda o: any(f[:-4] in os.path.basename(o)
                                                            for f in AVX2_SOURCES + AVX512_SOURCES))
                return link_one(objects, *args, **kwargs)

            self.compiler._compile = _compile
            self.compiler.link_shared_object = _link
            try:
                super().build_extension(extension)
            finally:
                self.compiler._compile = compile_one
                self.compiler.link_shared_object = link_one

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if os.environ.get("VCON_REQUIRE_EXTENSION"):
                    raise
                _say(f"the C++ extension failed to build ({type(exc).__name__}: {exc}); "
                     "the CPU ops will use the plain-torch path")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(**_extension_setup())
