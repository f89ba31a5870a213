#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this machine, for the
# ledger tests: they start a throwaway server of their own (tests/pg.py) and never use a
# system cluster. Quiet and quick when the binaries are already there.
#
# Installs Debian's `postgresql` package when run as root; otherwise says what to install.
# The package's postinst creates and starts a 'main' cluster: this script stops it again
# (the cluster is left in place, stopped; nothing here relies on it).
set -euo pipefail

have_server() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_server; then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb)." >&2
    echo "Install them, e.g.: sudo apt-get install --no-install-recommends postgresql" >&2
    echo "(or set HERALD_TEST_POSTGRES_URL to a database the tests may use)." >&2
    exit 1
fi

echo "Installing PostgreSQL server binaries (Debian package 'postgresql')..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
    >/dev/null

# Stop whatever cluster the package started; the tests run their own server.
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _port status _rest; do
        if [[ "$status" == online* ]]; then
            pg_ctlcluster "$version" "$cluster" stop || true
        fi
    done
fi
if command -v systemctl >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
    systemctl stop postgresql || true
fi

have_server || {
    echo "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb found" >&2
    exit 1
}
echo "PostgreSQL server binaries installed: $(compgen -G '/usr/lib/postgresql/*/bin/initdb')"
