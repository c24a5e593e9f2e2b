#!/usr/bin/env bash
# What tests/test_browser_form.py needs: Debian's chromium (playwright-core drives /usr/bin/chromium, so no
# browser is downloaded) and the page's npm packages exactly as package-lock.json pins them.
# Idempotent and quick once done: apt only when chromium is absent, `npm ci` only when node_modules is missing
# or was installed from another package-lock.json (a copy of the one installed is kept as the stamp).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
  as_root=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
fi

STAMP=node_modules/.package-lock.installed
if ! cmp -s package-lock.json "$STAMP"; then
  npm ci --no-audit --no-fund
  cp package-lock.json "$STAMP"
fi
