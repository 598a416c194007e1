#!/usr/bin/env bash
# Installs the system services the serving tests use, when missing: PostgreSQL (usage database tests) and
# Debian's chromium + chromium-driver (the playground's headless browser test), and the espeak-ng and flite
# speech synthesisers (multimodal audio data: training and held-out engines). Idempotent and quiet; the
# tests start their own PostgreSQL cluster and browser, and skip with a reason when these are absent.
set -euo pipefail
need=()
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v flite >/dev/null 2>&1 || need+=(flite)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
