#!/usr/bin/env bash
# Creates the project's virtual environment (VENV, default .venv) and installs requirements.txt into it.
# Sourced by serve.sh and test.sh so both README commands work on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$root/.venv}"
stamp="$VENV/.requirements.sha1"
want="$(sha1sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # Said on stderr, so a first run that goes quiet for minutes is explained (and `$(...)` captures stay clean).
  if [ -f "$stamp" ]; then
    echo "setup_env: requirements.txt changed: updating $VENV" >&2
  else
    echo "setup_env: first run: installing requirements.txt into $VENV" >&2
  fi
  echo "setup_env: torch with its CUDA libraries, torchvision, open_clip, segment-anything, OpenCV, FastAPI, the" \
       "Label Studio SDK, pytest ...: about 6 GB downloaded and unpacked, typically 3-10 minutes (network-bound);" \
       "later runs start at once" >&2
  t0=$SECONDS
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$root/requirements.txt"
  echo "$want" > "$stamp"
  echo "setup_env: installed in $((SECONDS - t0)) s ($(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV)" >&2
fi
export PATH="$VENV/bin:$PATH"
cd "$root"
