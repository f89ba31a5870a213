#!/usr/bin/env bash
# Make sure the tools `make bench` uses are on this machine: Debian's nginx (the webhook
# receiver), wrk (a reference HTTP load generator), postfix (for smtp-sink, the email
# receiver) and, in the project's venv, py-spy (the sampling profiler for the hot-path
# profile). Quiet and quick when everything is already there.
#
# Installs Debian packages when run as root; otherwise says what to install. Installing
# postfix (or nginx) starts system services: this script stops and disables them again, so
# no MTA is left listening on port 25 and nothing listens on port 80. The benchmark runs its
# own nginx and smtp-sink on free loopback ports.
set -euo pipefail

VENV_BIN=${VENV_BIN:-.venv/bin}

missing=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
[[ -x /usr/sbin/smtp-sink ]] || command -v smtp-sink >/dev/null || missing+=(postfix)

if ((${#missing[@]})); then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "missing for make bench: ${missing[*]}" >&2
        echo "install them, e.g.: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "Installing ${missing[*]} (Debian packages)..."
    # Postfix asks how to configure itself; 'No configuration' installs the binaries only.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string localhost" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# Whatever the packages started (now or on an earlier install): stop it, keep it from
# starting at boot. The benchmark's own servers run on ephemeral loopback ports.
for service in postfix nginx; do
    if command -v systemctl >/dev/null && systemctl list-unit-files "$service.service" \
        >/dev/null 2>&1; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
    if [[ -x "/etc/init.d/$service" ]]; then
        "/etc/init.d/$service" stop >/dev/null 2>&1 || true
        command -v update-rc.d >/dev/null && update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
done
# Without systemd (containers) the init scripts may not see a master started otherwise.
if [[ -x /usr/sbin/postfix ]] && /usr/sbin/postfix status >/dev/null 2>&1; then
    /usr/sbin/postfix stop >/dev/null 2>&1 || true
fi
if [[ -f /run/nginx.pid ]] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
    /usr/sbin/nginx -s quit >/dev/null 2>&1 || true
fi
if command -v ss >/dev/null && ss -ltnH 'sport = :25' | grep -q .; then
    echo "warning: something still listens on port 25:" >&2
    ss -ltnpH 'sport = :25' >&2
fi

if [[ ! -x "$VENV_BIN/py-spy" ]]; then
    echo "Installing py-spy into $VENV_BIN..."
    "$VENV_BIN/pip" install --quiet py-spy
fi
