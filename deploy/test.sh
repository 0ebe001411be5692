#!/usr/bin/env bash
# The whole Census test suite: installs what is missing (Debian packages for the lab, rustfmt,
# clippy, the Windows target), then runs the format check, clippy with -D warnings, the
# Windows check of the agent, and every test. Lab tests need root; CENSUS_SKIP_LAB=1 skips
# them on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh

step() { printf '\n==> %s\n' "$*"; }

step "installing what is missing"
if [ "${CENSUS_SKIP_LAB:-}" = 1 ]; then
    echo "CENSUS_SKIP_LAB=1: not installing the lab's Debian packages"
else
    census_install_debs "${CENSUS_LAB_PACKAGES[@]}"
fi
census_install_debs "${CENSUS_BUILD_PACKAGES[@]}" "${CENSUS_WINDOWS_PACKAGES[@]}"
census_install_debs "${CENSUS_TEST_PACKAGES[@]}" \
    || echo "census: systemd-analyze is missing: the systemd units will not be verified"
census_install_rust_parts

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo check -p census-agent --target x86_64-pc-windows-gnu"
cargo check -p census-agent --target x86_64-pc-windows-gnu --locked

# The Windows-only code (service, IP Helper backends) is otherwise never linted: clippy for that
# target too (it reuses the check's dependencies, so it costs seconds).
step "cargo clippy -p census-agent --target x86_64-pc-windows-gnu -- -D warnings"
cargo clippy -p census-agent --target x86_64-pc-windows-gnu --locked -- -D warnings

step "building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked

if [ "${CENSUS_SKIP_LAB:-}" = 1 ]; then
    echo
    echo "NOTE: lab tests were skipped (CENSUS_SKIP_LAB=1): nothing was tested against network namespaces."
fi
echo
echo "census: all checks passed"
