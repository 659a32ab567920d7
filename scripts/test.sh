#!/usr/bin/env bash
# Runs every check Tally has: formatting, clippy with warnings as errors, and all tests
# (unit, integration, .slt). Installs what the tests need when it is missing.
# This is the README's second command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests start as real servers. None are needed yet: the spine's tests
# use only the tally binary itself. Ingest issues add theirs here (e.g. prometheus).
DEB_PACKAGES=()
# Python packages used by tests as real clients. None yet.
PY_PACKAGES=()

missing_debs=()
for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing_debs+=("$pkg")
done
if ((${#missing_debs[@]})); then
    log "installing Debian packages: ${missing_debs[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing_debs[@]}"
fi
for pkg in "${PY_PACKAGES[@]}"; do
    python3 -c "import ${pkg%%[=<>]*}" 2>/dev/null || { log "installing $pkg"; python3 -m pip install -q "$pkg"; }
done

command -v cargo >/dev/null || { echo "cargo is not installed: install Rust with rustup first" >&2; exit 1; }
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "adding rustup component $comp"
        rustup component add "$comp"
    fi
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test (unit, integration, .slt)"
cargo test --workspace --locked
