"""Build the Cython extensions; metadata lives in pyproject.toml.

BLSSHM_DEBUG=1 turns bounds and wraparound checks back on for debugging.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("BLSSHM_DEBUG") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "initializedcheck": debug,
}

extensions = [
    Extension(
        "blsshm._core",
        ["blsshm/_core.pyx"],
        include_dirs=[numpy.get_include(), "blsshm"],
        depends=["blsshm/_sync.h", "blsshm/_layout.h", "blsshm/_copy.h", "blsshm/_spread.h",
                 "blsshm/_direct.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
    Extension(
        "blsshm._probe",
        ["blsshm/_probe.pyx"],
        include_dirs=["blsshm"],
        depends=["blsshm/_sync.h"],
        extra_compile_args=["-O2", "-std=gnu11"],
    ),
    Extension(
        "dlrm_bench._pooling",
        ["dlrm_bench/_pooling.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
