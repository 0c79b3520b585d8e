#!/usr/bin/env bash
# Set-up, then the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
set +e
.venv/bin/python -m pytest -q tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then  # pytest's "no tests collected" is not a failure of the code
  echo "pytest collected no tests"
  status=0
fi
exit "$status"
