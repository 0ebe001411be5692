# Shared by deploy/test.sh and deploy/demo.sh: install what Census's lab and build need.
# Sourced, not run.

# Debian packages the lab's real responders and tools come from.
CENSUS_LAB_PACKAGES=(iproute2 iputils-ping procps snmpd snmp python3-zeroconf)
# The lab's Active Directory: a Samba AD DC provisioned into the lab's temp dir (samba-ad-provision
# holds the schema), ldb-tools to write sam.ldb directly (bulk users, lastLogonTimestamp),
# ldap-utils for ldapsearch checks, openssl for the DC's LDAPS certificate. Like snmpd, the
# packages' own services are never used: the lab runs `samba` in its namespaces.
CENSUS_LAB_PACKAGES+=(samba samba-ad-dc samba-ad-provision winbind ldb-tools ldap-utils openssl)
# What every build needs, lab or not: a C compiler and libc headers (rustc links with `cc`, and
# ring, rustls's crypto for the agent's LDAPS, builds C).
CENSUS_BUILD_PACKAGES=(gcc libc6-dev)
# The Windows check of the agent: ring's C built for x86_64-pc-windows-gnu.
CENSUS_WINDOWS_PACKAGES=(gcc-mingw-w64-x86-64-win32)
# What the tests use beyond the lab: systemd-analyze (package systemd) verifies the units in
# deploy/systemd/ (agent/tests/service.rs; skipped with a note where it is missing). Only the
# tool is used: nothing is started, and the tests never run systemctl.
CENSUS_TEST_PACKAGES=(systemd)

# Installs the Debian packages named as arguments that are missing.
census_install_debs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "census: missing Debian packages ${missing[*]}: run as root, or install them (apt-get install ${missing[*]})" >&2
        return 1
    fi
    echo "census: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The snmpd package would start a system snmpd; the lab runs its own in namespaces.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Fails with one line when cargo is missing (Rust comes from rustup, not from Debian).
census_require_cargo() {
    command -v cargo >/dev/null || { echo "census: cargo is missing: install Rust with rustup first (https://rustup.rs)" >&2; return 1; }
}

# cargo, and the components and target the checks of deploy/test.sh use.
census_install_rust_parts() {
    census_require_cargo || return 1
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
    rustup target list --installed 2>/dev/null | grep -q '^x86_64-pc-windows-gnu$' || rustup target add x86_64-pc-windows-gnu
}
