#!/usr/bin/env bash
# The discovery benchmark: builds simulated client sites in network namespaces (a /24 with 100
# hosts, a /20 with 500, a /16 with 20), sweeps them with census-agent, arp-scan and nmap -sn at
# their defaults and at one equal packet rate, prints wall time, recall and the ratios, then the
# agent's peak RSS during a /16 sweep, and removes everything it built. Needs root (network
# namespaces); installs what it needs; builds in release mode (debug figures mean nothing).
# Packets stay inside the namespaces it creates, on 198.18.0.0/15.
# Arguments go to census-bench: --rate PPS (equal rate, default 500), --runs N (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "census bench: needs root to create network namespaces: run sudo deploy/bench.sh" >&2
    exit 77
fi
census_install_debs
# The peers and GNU time (for peak RSS): only the benchmark needs them.
bench_missing=()
for p in arp-scan nmap time; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || bench_missing+=("$p")
done
if [ "${#bench_missing[@]}" -gt 0 ]; then
    echo "census bench: installing ${bench_missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${bench_missing[@]}" >/dev/null
fi
census_install_rust_parts
echo "==> building (release)"
cargo build --release --workspace --bins --locked
echo "==> running the benchmark"
exec ./target/release/census-bench "$@"
