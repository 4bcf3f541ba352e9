# Shared set-up, sourced by demo.sh and test.sh: create .venv if missing and install the
# pinned requirements, skipping the install when requirements.txt and pyproject.toml are
# unchanged since the last successful one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
STAMP=.venv/.installed-requirements.sha256
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# Everything the demo and the tests need is on disk: never reach for the hub.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
