#!/usr/bin/env bash
# Set up (a no-op once done), then run the test suite: `bash scripts/test.sh [pytest args]`,
# e.g. `bash scripts/test.sh tests/unit -k router`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=15 "$@"
