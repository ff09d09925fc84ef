#!/usr/bin/env bash
# README command 1: start the Label Studio ML backend (port 9090) on the embedded offline demo model.
source "$(dirname "$0")/setup_env.sh"
exec python -m labelstudio_backend "$@"
