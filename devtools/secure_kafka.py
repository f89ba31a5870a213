"""A local broker with a SASL_SSL listener (SCRAM-SHA-512 over TLS, a throwaway CA), to try
Herald's security settings without a cluster:

    python -m devtools.secure_kafka up      # prints the settings to export
    python -m devtools.secure_kafka down

Its files live under .herald/secure-kafka (the CA and keys in tls/). The SCRAM user is
``herald`` with a password made at the first ``up`` and kept in tls/password (mode 0600).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from devtools.procs import free_ports
from devtools.tls import local_tls
from pipeline.kafka.local import BrokerTls, LocalKafka
from pipeline.settings import project_root

HOME = project_root() / ".herald" / "secure-kafka"
USER = "herald"


def _broker(ports: list[int] | None = None) -> tuple[LocalKafka, Path]:
    tls_dir = HOME / "tls"
    password_file = tls_dir / "password"
    ports_file = HOME / "ports"
    if not (tls_dir / "ca.pem").exists():
        local_tls(tls_dir)
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(18))
        password_file.chmod(0o600)
    if ports_file.exists():
        port, controller, sasl_ssl = map(int, ports_file.read_text().split())
    else:
        port, controller, sasl_ssl = ports or free_ports(3)
        ports_file.write_text(f"{port} {controller} {sasl_ssl}")
    lib = HOME / "lib"
    if not lib.exists():
        lib.symlink_to(project_root() / ".herald" / "kafka" / "lib")
    kafka = LocalKafka(
        HOME,
        port=port,
        controller_port=controller,
        sasl_ssl_port=sasl_ssl,
        tls=BrokerTls(tls_dir / "server-chain.pem", tls_dir / "server-key.pem"),
        scram_users={USER: password_file.read_text()},
    )
    return kafka, tls_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.secure_kafka")
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    HOME.mkdir(parents=True, exist_ok=True)
    kafka, tls_dir = _broker()
    if args.action == "down":
        print("stopped" if kafka.stop() else "not running")
        return 0
    seconds = kafka.start()
    print(
        f"Kafka {kafka.version()} ready in {seconds:.1f}s: SASL_SSL on "
        f"{kafka.sasl_ssl_bootstrap_servers}, PLAINTEXT on {kafka.bootstrap_servers}",
        file=sys.stderr,
    )
    print(f"export KAFKA_BOOTSTRAP_SERVERS={kafka.sasl_ssl_bootstrap_servers}")
    print("export HERALD_KAFKA_SECURITY_PROTOCOL=SASL_SSL")
    print("export HERALD_KAFKA_SASL_MECHANISM=SCRAM-SHA-512")
    print(f"export HERALD_KAFKA_SASL_USERNAME={USER}")
    print(f"export HERALD_KAFKA_SASL_PASSWORD=$(cat {tls_dir / 'password'})")
    print(f"export HERALD_KAFKA_SSL_CA_FILE={tls_dir / 'ca.pem'}")
    print(f"export HERALD_KAFKA_HOME={HOME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
