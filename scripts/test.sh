#!/usr/bin/env bash
# Set up .venv (see _setup.sh), then run the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
python -m pytest "$@"
