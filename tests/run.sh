#!/usr/bin/env bash
# The test command: every test of the workspace, with what the tests need installed first.
# Usage: ./tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
