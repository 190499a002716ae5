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
"$python" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])'
