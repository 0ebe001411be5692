#!/usr/bin/env bash
# The discovery benchmark: builds simulated client sites in network namespaces (a /24 with 100
# hosts, a /20 with 500, a /16 with 20), sweeps them with census-agent, arp-scan and nmap -sn at
# their defaults and at one equal packet rate, prints wall time, recall and the ratios, then the
# agent's peak RSS during a /16 sweep, and removes everything it built. Needs root (network
# namespaces); installs what it needs; builds in release mode (debug figures mean nothing).
# Packets stay inside the namespaces it creates, on 198.18.0.0/15.
# Then the collector benchmark (census-collector-bench): ingest throughput with durable acks from
# many agent streams, GetCounts latency over 1,000 clients of 1,000 devices, and memory per
# device, against a census-collector on 127.0.0.1 (loopback gRPC only; nothing is swept).
# Arguments go to census-bench: --rate PPS (equal rate, default 500), --runs N (default 1);
# CENSUS_COLLECTOR_BENCH_ARGS (e.g. "--seconds 30") goes to census-collector-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "census bench: needs root to create network namespaces: run sudo deploy/bench.sh" >&2
    exit 77
fi
census_install_debs "${CENSUS_LAB_PACKAGES[@]}"
# The peers and GNU time (for peak RSS): only the benchmark needs them.
census_install_debs arp-scan nmap time
census_install_debs "${CENSUS_BUILD_PACKAGES[@]}"
census_install_rust_parts
echo "==> building (release)"
cargo build --release --workspace --bins --locked
echo "==> running the discovery benchmark"
status=0
./target/release/census-bench "$@" || status=$?
echo "==> running the collector benchmark"
# shellcheck disable=SC2086 # word splitting of the extra arguments is intended
./target/release/census-collector-bench ${CENSUS_COLLECTOR_BENCH_ARGS:-} || status=$?
exit "$status"
