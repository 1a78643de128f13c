"""Describes the C extension cecollm._core; metadata lives in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

import numpy
from setuptools import Extension, setup

# pkg-config module -> the Debian package that provides it
NATIVE_DEPENDENCIES = {"msgpack": "libmsgpack-dev"}


def pkg_config(module: str, debian_package: str) -> tuple[list[str], list[str]]:
    """Compile and link flags of a pkg-config module, or a build error naming the package to install."""
    if shutil.which("pkg-config") is None:
        raise SystemExit("cecollm: pkg-config is missing; install it with: apt-get install pkg-config")
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", module], text=True).split()
        libs = subprocess.check_output(["pkg-config", "--libs", module], text=True).split()
    except subprocess.CalledProcessError:
        raise SystemExit(
            f"cecollm: the C library '{module}' was not found by pkg-config; "
            f"install it with: apt-get install {debian_package}"
        ) from None
    return cflags, libs


cflags, libs = [], []
for module, package in NATIVE_DEPENDENCIES.items():
    c, lib = pkg_config(module, package)
    cflags += c
    libs += lib

sources = sorted(str(p) for p in Path("csrc/core").glob("*.c"))
sources += sorted(str(p) for p in Path("csrc/arch").glob("*.c"))
sources += ["csrc/py/module.c"]

core = Extension(
    "cecollm._core",
    sources=sources,
    include_dirs=["csrc/include", "csrc/core", numpy.get_include()],
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", *cflags],
    extra_link_args=[*libs, "-lm"],
)

setup(ext_modules=[core])
