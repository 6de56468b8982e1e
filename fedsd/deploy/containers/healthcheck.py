"""Container health checks (HEALTHCHECK and compose/Kubernetes ``healthcheck``).

    python -m fedsd.deploy.containers.healthcheck https URL [--ca FILE]
                            GET URL (TLS verified against FILE), healthy on 200
    python -m fedsd.deploy.containers.healthcheck http URL
                            GET URL (plain HTTP, e.g. a metrics exporter)
    python -m fedsd.deploy.containers.healthcheck grpc HOST:PORT
                            gRPC health Check (Flower's --health-server-address)

Exit 0 when healthy, 1 otherwise (with the reason on stderr), as Docker expects. The URL
probe is fedsd.common.health's, the one every SuperLink wait uses. Imports only the
standard library, fedsd.common.health and (for ``grpc``) Flower's grpc: the SuperLink
image runs it from a copy of fedsd's sources, without fedsd's dependencies.
"""

from __future__ import annotations

import argparse
import sys


def check_grpc(address: str, timeout: float) -> str | None:
    """None when the gRPC health service at ``address`` reports SERVING, else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsd.deploy.containers.healthcheck",
        description="Container health check: exit 0 when healthy, 1 otherwise.",
    )
    parser.add_argument("--timeout", type=float, default=4.0)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("https")
    p.add_argument("url")
    p.add_argument("--ca", default=None)
    p = sub.add_parser("http")
    p.add_argument("url")
    p = sub.add_parser("grpc")
    p.add_argument("address")
    args = parser.parse_args(argv)
    if args.kind in ("https", "http"):
        # Imported here: the gRPC check, run every few seconds in each app container,
        # need not pay for urllib and ssl (~0.1 CPU-s a check).
        from fedsd.common.health import probe_url

        ca = getattr(args, "ca", None)
        try:
            error = probe_url(args.url, ca, timeout=args.timeout)
        except OSError as exc:  # the CA file: missing or unreadable (certs not mounted yet)
            error = f"CA certificate {ca}: {exc}"
    else:
        error = check_grpc(args.address, args.timeout)
    if error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
