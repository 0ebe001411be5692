#!/usr/bin/env bash
# Census's main job, end to end, as a tour: two client sites with the same subnet in network
# namespaces, real devices answering SNMP and mDNS, a Samba AD DC with users of every kind, the
# collector and one agent per site; then `census counts`, one device's evidence, the users and
# why each counts, a billing snapshot and its CSV, every number checked against what was built.
# Removes everything it built, even on failure or Ctrl-C. Needs root (network namespaces);
# installs the Debian packages it needs (deploy/lib.sh) and builds release binaries first.
# Packets stay inside the namespaces it creates, on 198.18.0.0/15.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "census demo: needs root to create network namespaces: run sudo deploy/demo.sh" >&2
    exit 77
fi
census_install_debs "${CENSUS_LAB_PACKAGES[@]}" "${CENSUS_BUILD_PACKAGES[@]}"
census_require_cargo
echo "==> building (release)"
cargo build --release --workspace --bins --locked
echo "==> running the demo"
exec "${CARGO_TARGET_DIR:-target}/release/census-demo"
