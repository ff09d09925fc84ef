#!/usr/bin/env bash
# Reproduce the shipped offline demo model (labelstudio_backend/default_model/ovsam_demo.safetensors) from
# scratch on synthetic shapes: about 240 minutes on 2 CPU cores, a few minutes on a GPU. Options pass through
# to `python -m training demo-model` (e.g. --work DIR, --steps N, --device cuda, --out other.safetensors).
source "$(dirname "$0")/setup_env.sh"
exec python -m training demo-model "$@"
