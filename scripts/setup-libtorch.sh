#!/usr/bin/env bash
# Installs PyPI's torch==2.11.0 (which carries libtorch 2.11.0, the exact version tch 0.24 binds)
# into a virtualenv outside the repository, only when it is missing or at another version.
# Prints the libtorch directory (the `torch` package folder) on stdout as its last line.
set -euo pipefail
TORCH_VERSION=2.11.0
cache="${ADAMCU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adamcu}"
venv="$cache/torch-$TORCH_VERSION"
python="$venv/bin/python"

installed_version() {
  [ -x "$python" ] || return 1
  "$python" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.version("torch"))
PY
}

if [ "$(installed_version || true)" != "$TORCH_VERSION" ]; then
  echo "adamcu: installing torch==$TORCH_VERSION (libtorch) into $venv (about 5 GB, once)" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi
# find_spec locates the package without importing it (importing takes seconds).
torch_dir=$("$python" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')

# A CUDA wheel ships the CUDA runtime's headers but not the two more that ProcessGroupNCCL's
# header needs to compile (crt/host_config.h and libcu++'s nv/target): PyPI's nvidia-cuda-crt
# and nvidia-cuda-cccl (about 20 MB) at the wheel's CUDA version add them, so that build.rs
# builds the NCCL backend (DEVELOPERS.md). Without them (offline) the build goes on without NCCL.
if [ -e "$torch_dir/lib/libtorch_cuda.so" ]; then
  cuda_version=$("$python" -c 'import importlib.metadata as m; print(".".join(m.version("nvidia-cuda-runtime").split(".")[:2]))' 2>/dev/null || true)
  include=$(dirname "$torch_dir")/nvidia/cu${cuda_version%%.*}/include
  if [ -n "$cuda_version" ] && { [ ! -e "$include/crt/host_config.h" ] || [ ! -e "$include/nv/target" ]; }; then
    echo "adamcu: installing nvidia-cuda-crt and nvidia-cuda-cccl $cuda_version.* (headers for the NCCL backend)" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
      "nvidia-cuda-crt==$cuda_version.*" "nvidia-cuda-cccl==$cuda_version.*" >&2 ||
      echo "adamcu: could not install them; the NCCL backend will not be built" >&2
  fi
fi
echo "$torch_dir"
