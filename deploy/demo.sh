#!/usr/bin/env bash
# Census's main job, end to end: builds two simulated client sites with the same subnet in
# network namespaces, runs the collector and one agent per site, sweeps, prints the per-client
# counts, and removes everything it built. Needs root (network namespaces); installs what it
# needs. Packets stay inside the namespaces it creates, on 198.18.0.0/15.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "census demo: needs root to create network namespaces: run sudo deploy/demo.sh" >&2
    exit 77
fi
census_install_debs "${CENSUS_LAB_PACKAGES[@]}"
census_install_debs "${CENSUS_BUILD_PACKAGES[@]}"
census_install_rust_parts
echo "==> building (release)"
cargo build --release --workspace --bins --locked
echo "==> running the demo"
exec ./target/release/census-demo
