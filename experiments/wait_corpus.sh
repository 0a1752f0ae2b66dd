#!/usr/bin/env bash
# Waits (up to 5 minutes) for the corpus that a first run builds (runs/data/*/meta.json), so that runs started beside
# it reuse it instead of each building it. Used by gpu_runs.sh (side_by_side) and gpu_detached.sh (start).
for _ in $(seq 150); do ls runs/data/*/meta.json > /dev/null 2>&1 && exit 0; sleep 2; done
