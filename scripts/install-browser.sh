#!/usr/bin/env bash
# Installs Debian's chromium + chromedriver for the dashboard browser test (no browser download).
# Succeeds quietly when they are already present; the test skips with a reason when they are not.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1
fi
command -v chromium >/dev/null 2>&1
