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
# The feature browser's UI tests drive Debian's headless Chromium (lineofsight/chromium.py).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium and chromium-driver (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }
    apt_install || { apt-get update -qq && apt_install; } \
      || { echo "[setup] could not install chromium + chromium-driver (the browser tests and the demo need them)" >&2; exit 1; }
  else
    echo "[setup] hint: the browser UI tests need /usr/bin/chromium and /usr/bin/chromedriver" \
      "(sudo apt-get install chromium chromium-driver); without them they fail"
  fi
fi
export PATH="$ROOT/.venv/bin:$PATH"
# Everything the demo and the tests need is on disk: never reach for the hub.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
