#!/usr/bin/env bash
# Install the offline data packages used by cliptune.data.sources.
#
#   scripts/install_data_packages.sh [NPM_DIR]
#
# - Debian: openclipart-png, openclipart-svg (Open Clip Art Library, public domain),
#   fonts-noto-color-emoji (the emoji font), wordnet-base (WordNet for hard-negative captions) and
#   dataset-fashion-mnist (a labelled set for classification fine-tuning). Each is installed only if `dpkg -s` says it is missing,
#   and `apt-get update` runs only when something has to be installed.
# - npm: emojibase-data (emoji labels and tags) into NPM_DIR (default data/.npm), skipped when present.
#
# Idempotent and non-interactive. Runs apt-get as root, through sudo when not root, and otherwise
# says what to run by hand.
set -euo pipefail

NPM_DIR="${1:-data/.npm}"
DEB_PACKAGES=(openclipart-png openclipart-svg fonts-noto-color-emoji wordnet-base dataset-fashion-mnist)

# Choose how to get root for apt-get; empty SUDO means "already root".
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        SUDO="__none__"
    fi
fi

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    # dpkg -s exits 0 also for removed-but-configured packages, so check the status line too.
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "Debian packages already installed: ${DEB_PACKAGES[*]}"
elif [ "$SUDO" = "__none__" ]; then
    echo "ERROR: need root to install Debian packages: ${missing[*]}" >&2
    echo "Run as root:  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
else
    echo "Installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# emojibase-data is only on npm; it is optional (the Open Clip Art set does not need it).
if [ -f "$NPM_DIR/node_modules/emojibase-data/en/data.json" ]; then
    echo "emojibase-data already installed in $NPM_DIR"
elif command -v npm >/dev/null 2>&1; then
    mkdir -p "$NPM_DIR"
    echo "Installing emojibase-data into $NPM_DIR"
    npm install --prefix "$NPM_DIR" --no-audit --no-fund --loglevel=error emojibase-data
else
    echo "WARNING: npm not found; skipping emojibase-data (needed only for the emoji set)." >&2
    echo "Install Node.js/npm (e.g. apt-get install -y npm) and re-run this script." >&2
fi

echo "Done."
echo "  Open Clip Art: /usr/share/openclipart/{png,svg}"
echo "  Emoji font:    $(dpkg -L fonts-noto-color-emoji 2>/dev/null | grep -m1 -i 'NotoColorEmoji.ttf' || echo 'not found')"
echo "  emojibase:     $NPM_DIR/node_modules/emojibase-data/en/data.json"
