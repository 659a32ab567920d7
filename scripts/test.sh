#!/usr/bin/env bash
# Runs every check Tally has: formatting, clippy with warnings as errors, and all tests
# (unit, integration, .slt). Installs what the tests need when it is missing.
# This is the README's second command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests start as real servers (each test starts its own on 127.0.0.1
# and stops it): Prometheus remote-writes into Tally and is pulled by it; node_exporter is
# scraped.
DEB_PACKAGES=(prometheus prometheus-node-exporter)
# Python packages used by tests, as "pip-name:import-name": a real Pushgateway client, and
# the validator that checks Grafana API answers against the plugin's OpenAPI file.
PY_PACKAGES=("prometheus-client:prometheus_client" "jsonschema:jsonschema" "PyYAML:yaml")

missing_debs=()
for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing_debs+=("$pkg")
done
if ((${#missing_debs[@]})); then
    log "installing Debian packages: ${missing_debs[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_debs[@]}"
fi
for spec in "${PY_PACKAGES[@]}"; do
    pip_name="${spec%%:*}"
    import_name="${spec##*:}"
    python3 -c "import $import_name" 2>/dev/null || {
        log "installing $pip_name"
        python3 -m pip install -q "$pip_name"
    }
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
