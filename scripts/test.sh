#!/usr/bin/env bash
# README command 2: run the test suite.
source "$(dirname "$0")/setup_env.sh"
exec python -m pytest "$@"
