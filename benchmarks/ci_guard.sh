#!/usr/bin/env bash
# Regression guard that CI can afford: a quick CPU run of `vae-fast bench` whose table and
# foundation-target ratios land in the CI log. Informational: CI machines are too noisy for a timed
# assertion, so it exits 0 unless the run itself fails (an exception, a crashed kernel).
# Usage: benchmarks/ci_guard.sh [PYTHON]   (default: python on PATH)
set -euo pipefail
python="${1:-python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$python" -m vae_fast bench --quick --device cpu --out "$out"
