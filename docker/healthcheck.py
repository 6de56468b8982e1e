"""Container health checks (HEALTHCHECK and compose ``healthcheck``), standard library + grpc.

    healthcheck.py https URL [--ca FILE]   GET URL (TLS verified against FILE), healthy on 200
    healthcheck.py http URL                GET URL (plain HTTP, e.g. a metrics exporter)
    healthcheck.py grpc HOST:PORT          gRPC health Check (Flower's --health-server-address)

Exit 0 when healthy, 1 otherwise (with the reason on stderr), as Docker expects.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request


def check_https(url: str, ca: str | None, timeout: float) -> str | None:
    ctx = ssl.create_default_context(cafile=ca)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:  # noqa: S310
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except OSError as exc:
        return str(exc)


def check_grpc(address: str, timeout: float) -> str | None:
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
        error = check_https(args.url, getattr(args, "ca", None), args.timeout)
    else:
        error = check_grpc(args.address, args.timeout)
    if error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
