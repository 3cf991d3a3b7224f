#!/usr/bin/env bash
# Installs the emulators the checkpoint tests start that are not Python packages: Azurite (npm), pinned by
# package.json + package-lock.json, into tests/emulators/node_modules. Idempotent: a no-op once installed.
# The Python ones (moto[server], gcp-storage-emulator) come from the project's dev dependencies.
# Exit status 3: npm is missing, so the Azure tests skip.
set -euo pipefail
cd "$(dirname "$0")"
marker="node_modules/.installed-$(sha256sum package-lock.json | cut -c1-16)"
if [ -f "$marker" ] && [ -x node_modules/.bin/azurite-blob ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install.sh: npm not found; install Node.js >= 18 (Debian: apt-get install nodejs npm)" >&2
    exit 3
fi
npm ci --no-audit --no-fund --loglevel=error
touch "$marker"
