# Cross-build toma_edge_native for aarch64 Linux (Debian 12 / Raspberry Pi OS 64-bit) on an
# x86_64 Debian 12 machine. Used by scripts/build_native.sh aarch64, which first runs
# scripts/aarch64_env.sh: that installs g++-aarch64-linux-gnu and qemu-user-static and builds
# the sysroot with arm64 Python 3.11 (headers and the interpreter) that this file points at:
# $TOMA_AARCH64_SYSROOT, else ${TOMA_EDGE_CACHE:-~/.cache/toma-edge}/aarch64-sysroot.
#
# The compiler's own libc/libstdc++ (the cross toolchain's, /usr/aarch64-linux-gnu) are used
# to build; the sysroot only adds Python's headers. Python's interpreter stays the host's
# (FindPython's pre-4.1 cross behaviour, policy CMP0190 OLD under cmake_minimum_required
# 3.28): CMakeLists.txt runs prepare_executorch.py with it, which fetches the executorch
# aarch64 wheel's runtime libraries for CMAKE_SYSTEM_PROCESSOR.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# the sysroot holds CPython 3.11: fetch the executorch runtime of its cp311 wheel
set(TOMA_TARGET_PYTHON 311)

if(DEFINED ENV{TOMA_AARCH64_SYSROOT})
  set(TOMA_AARCH64_SYSROOT "$ENV{TOMA_AARCH64_SYSROOT}")
elseif(DEFINED ENV{TOMA_EDGE_CACHE})
  set(TOMA_AARCH64_SYSROOT "$ENV{TOMA_EDGE_CACHE}/aarch64-sysroot")
else()
  set(TOMA_AARCH64_SYSROOT "$ENV{HOME}/.cache/toma-edge/aarch64-sysroot")
endif()
if(NOT EXISTS "${TOMA_AARCH64_SYSROOT}/usr/include/python3.11/Python.h")
  message(FATAL_ERROR "no arm64 Python headers in ${TOMA_AARCH64_SYSROOT}: run scripts/aarch64_env.sh")
endif()
# try_compile projects re-read this file: hand them the resolved path
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES TOMA_AARCH64_SYSROOT)

# Target headers and libraries come from the cross toolchain and the sysroot; packages may
# also be the host's (nanobind is source only); executorch's config is found through
# executorch_DIR, and its absolute paths lie under the cache root, which is therefore a root
# too (CMake does not re-root a path that already lies under a root).
get_filename_component(_toma_cache "${TOMA_AARCH64_SYSROOT}" DIRECTORY)
set(CMAKE_FIND_ROOT_PATH "/usr/aarch64-linux-gnu" "${TOMA_AARCH64_SYSROOT}" "${_toma_cache}")
if(DEFINED ENV{TOMA_EXECUTORCH_DIR})
  list(APPEND CMAKE_FIND_ROOT_PATH "$ENV{TOMA_EXECUTORCH_DIR}")
endif()
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# Python: the sysroot's arm64 headers. Debian's python3.11/pyconfig.h only dispatches to
# <aarch64-linux-gnu/python3.11/pyconfig.h>, so the sysroot's usr/include goes on every
# compile line (-isystem); it holds nothing but Python's headers (no libc6-dev there).
# These override scikit-build-core's Python hints, which describe the host's Python; its
# Python_EXECUTABLE hint (the host's) is the one wanted.
set(Python_INCLUDE_DIR "${TOMA_AARCH64_SYSROOT}/usr/include/python3.11" CACHE PATH
    "arm64 Python headers" FORCE)
set(Python3_INCLUDE_DIR "${Python_INCLUDE_DIR}" CACHE PATH "arm64 Python headers" FORCE)
# The module's suffix: nanobind takes SKBUILD_SOABI, else Python_SOABI, which FindPython
# takes from the host's interpreter (x86_64) here. scikit-build-core sets SKBUILD_SOABI from
# SETUPTOOLS_EXT_SUFFIX (see scripts/build_native.sh); a plain CMake build gets it here.
if(NOT DEFINED SKBUILD_SOABI)
  set(SKBUILD_SOABI "cpython-311-aarch64-linux-gnu")
endif()
set(CMAKE_C_STANDARD_INCLUDE_DIRECTORIES "${TOMA_AARCH64_SYSROOT}/usr/include")
set(CMAKE_CXX_STANDARD_INCLUDE_DIRECTORIES "${TOMA_AARCH64_SYSROOT}/usr/include")
# No CMAKE_CROSSCOMPILING_EMULATOR: under policy CMP0190 NEW (cmake_minimum_required >= 4.1)
# FindPython would then take the target's interpreter (through qemu) as Python_EXECUTABLE,
# and prepare_executorch.py needs the host's, with pip.
