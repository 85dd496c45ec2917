#!/usr/bin/env bash
# A CUDA toolchain for building lethe with `--features cuda` on a machine that has no GPU and no
# system CUDA toolkit, made only from NVIDIA's wheels on PyPI.
#
#   source scripts/cuda-toolchain.sh          # install (once) and export the build environment
#   bash   scripts/cuda-toolchain.sh --print  # install (once) and print the `export` lines
#
# Why CUDA 13: NVIDIA's `*-cu12` wheels ship `ptxas` but not `nvcc`; the CUDA 13 wheels
# (`nvidia-cuda-nvcc` 13.x) ship the whole compiler (nvcc, cicc, cudafe++, fatbinary, nvlink) and
# lay everything out as one toolkit root, `site-packages/nvidia/cu13/{bin,include,lib,nvvm}`.
# cudarc 0.19.10 knows CUDA 13.0 (`cuda-13000`). A binary built with it needs an NVIDIA driver
# that supports CUDA 13.0 (>= 580) at run time; the Docker image (docker/Dockerfile.cuda) builds
# against a CUDA 12 toolkit instead.
#
# What the build needs, and what this provides:
# - nvcc on PATH: candle-kernels' build script (cudaforge) compiles its .cu files to PTX and a
#   static `libmoe.a`; cudarc's build script runs `nvcc --version` to pick its CUDA bindings.
# - CUDA_COMPUTE_CAP: there is no `nvidia-smi` to ask; 90 = H100/H200 (built as sm_90a),
#   80 = A100, 89 = L4/L40/RTX 4090, 86 = A10/RTX 3090.
# - link-time libraries: candle turns on cudarc's `dynamic-linking`, so the linker wants
#   libcuda, libcudart, libcublas, libcublasLt, libcurand and libnvrtc as `lib<name>.so`. The
#   wheels ship only versioned names (`libcublas.so.13`), so unversioned symlinks are added, and
#   libcuda (the driver, which no wheel ships) gets a stub built from cudarc's own list of
#   driver functions. The stub is for linking only (soname libcuda.so.1): at run time the real
#   driver's libcuda.so.1 is found instead; the stub is never on LD_LIBRARY_PATH.
#
# Settings: LETHE_CUDA_VENV (default .venv-cuda in the repository), CUDA_COMPUTE_CAP (default 90).

_lethe_cuda_main() {
    local venv="${LETHE_CUDA_VENV:-$(git rev-parse --show-toplevel 2>/dev/null || pwd)/.venv-cuda}"
    local py="${PYTHON:-python3}"
    # Pinned: one CUDA 13.0 release of each component.
    local wheels=(
        "nvidia-cuda-nvcc==13.0.88"
        "nvidia-nvvm==13.0.88"
        "nvidia-cuda-crt==13.0.88"
        "nvidia-cuda-runtime==13.0.96"
        "nvidia-cuda-cccl==13.0.85"
        "nvidia-cuda-nvrtc==13.0.88"
        "nvidia-cublas==13.0.2.14"
        "nvidia-curand==10.4.5.25"
    )

    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv "$venv" || return 1
    fi
    local have
    have="$("$venv/bin/python" -m pip freeze 2>/dev/null | sed -n 's/^nvidia-\(cuda-nvcc\|cublas\)==/\1=/p' | sort | tr '\n' ' ')"
    if [ "$have" != "cublas=13.0.2.14 cuda-nvcc=13.0.88 " ]; then
        echo "cuda-toolchain: installing CUDA 13.0 wheels into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}" >&2 ||
            return 1
    fi

    local root
    root="$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')" ||
        return 1
    if [ ! -x "$root/bin/nvcc" ]; then
        echo "cuda-toolchain: no nvcc under $root" >&2
        return 1
    fi

    # Unversioned names for the linker.
    local lib
    for lib in cudart cublas cublasLt nvrtc; do
        ln -sfn "lib$lib.so.13" "$root/lib/lib$lib.so"
    done
    ln -sfn libcurand.so.10 "$root/lib/libcurand.so"

    # Link-only stub of the driver library, exporting every driver function cudarc declares.
    local stub="$root/lib/stubs/libcuda.so"
    if [ ! -e "$stub" ]; then
        local cudarc_src
        cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n1)"
        if [ -z "$cudarc_src" ]; then
            # The crate's sources are needed for the symbol list.
            (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo fetch --locked >&2) || return 1
            cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n1)"
        fi
        mkdir -p "$root/lib/stubs"
        grep -oE '^ *fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" |
            sed -E 's/^ *fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
            awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$root/lib/stubs/libcuda-stub.c"
        # 34 = CUDA_ERROR_STUB_LIBRARY, should the stub ever be loaded by mistake.
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib/stubs/libcuda-stub.c" ||
            return 1
    fi

    _LETHE_CUDA_ENV=(
        "CUDA_HOME=$root"
        "CUDA_ROOT=$root"
        "CUDA_PATH=$root"
        "CUDA_TOOLKIT_ROOT_DIR=$root"
        "NVCC=$root/bin/nvcc"
        "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
        "PATH=$root/bin:$PATH"
        "LIBRARY_PATH=$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    )
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    _lethe_cuda_main
    if [ "${1:-}" = "--print" ] || [ -z "${1:-}" ]; then
        for kv in "${_LETHE_CUDA_ENV[@]}"; do
            printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
        done
    fi
else
    if _lethe_cuda_main; then
        for kv in "${_LETHE_CUDA_ENV[@]}"; do
            export "${kv?}"
        done
        nvcc --version | tail -n 2 >&2
    else
        echo "cuda-toolchain: setup failed" >&2
        return 1 2>/dev/null
    fi
fi
