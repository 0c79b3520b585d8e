#!/usr/bin/env bash
# Set-up (incremental after the first run), then the whole test suite on every core (pytest-xdist;
# VAE_FAST_TEST_WORKERS=0 runs it in this process). Extra arguments go to pytest: files or -k to run
# a part (without any, pytest runs testpaths: tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
set +e
.venv/bin/python -m pytest -q -n "${VAE_FAST_TEST_WORKERS:-$(nproc)}" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then  # pytest's "no tests collected" is not a failure of the code
  echo "pytest collected no tests"
  status=0
fi
exit "$status"
