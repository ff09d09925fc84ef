#!/usr/bin/env bash
# Creates (or reuses) a separate virtual environment with a real Label Studio for the end-to-end
# tests, outside the repository, and prints the path of its `label-studio` executable on stdout.
# Label Studio is never installed into the project's own venv (it pins its own Django, numpy, ...).
#
#   LS_VENV     where the venv lives (default: $HOME/.cache/ovsam-e2e/ls-venv)
#   LS_VERSION  Label Studio version (default: 1.23.2, the version the protocol notes were read from)
#   LS_PYTHON   interpreter used to create the venv (default: python3)
#
# Idempotent: a finished install leaves a stamp file and later runs only print the path.
# Progress and pip output go to stderr, so `ls="$(bash scripts/labelstudio_env.sh)"` works.
set -euo pipefail
LS_VERSION="${LS_VERSION:-1.23.2}"
LS_VENV="${LS_VENV:-$HOME/.cache/ovsam-e2e/ls-venv}"
LS_PYTHON="${LS_PYTHON:-python3}"
exe="$LS_VENV/bin/label-studio"
stamp="$LS_VENV/.ovsam-label-studio-version"

installed() { [ -x "$exe" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$LS_VERSION" ]; }

if installed; then
  echo "$exe"
  exit 0
fi

mkdir -p "$(dirname "$LS_VENV")"
# One installer at a time (parallel test runs share the venv).
exec 9>"$LS_VENV.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if installed; then  # another process finished the install while we waited
  echo "$exe"
  exit 0
fi

echo "labelstudio_env: installing label-studio==$LS_VERSION into $LS_VENV (about a minute, once)" >&2
rm -f "$stamp"
if [ ! -x "$LS_VENV/bin/python" ]; then
  "$LS_PYTHON" -m venv "$LS_VENV" >&2
fi
"$LS_VENV/bin/python" -m pip install -q --upgrade pip >&2
"$LS_VENV/bin/python" -m pip install -q "label-studio==$LS_VERSION" >&2
# Check that it imports (a `label-studio --version` would start a server: it is not a flag).
"$LS_VENV/bin/python" -c "import label_studio, sys; sys.stderr.write('label_studio ' + label_studio.__version__ + '\n')" >&2
[ -x "$exe" ] || { echo "labelstudio_env: $exe missing after install" >&2; exit 1; }
echo "$LS_VERSION" > "$stamp"
echo "$exe"
