#!/usr/bin/env bash
# Screenshots an HTML report (e.g. report/report.html from `brittle analyze`) with headless
# Debian chromium, to look at it without a browser:
#   scripts/screenshot-report.sh report/report.html out.png [width height]
# Installs chromium with apt-get when missing (needs root). Offline: no network use.
set -euo pipefail
html="${1:?usage: $0 report.html out.png [width height]}"
out="${2:?usage: $0 report.html out.png [width height]}"
w="${3:-1200}"
h="${4:-4000}"
if ! command -v chromium >/dev/null; then
  apt-get install -y chromium >/dev/null
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --window-size="$w,$h" --screenshot="$(realpath -m "$out")" \
  "file://$(realpath "$html")" 2>/dev/null
echo "wrote $out"
