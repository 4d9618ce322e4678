"""`python -m gcfs.fakegc [--port N] [--latency S]`: serve demo_world() until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from gcfs.fakegc.server import FakeGC
from gcfs.fakegc.world import demo_world


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gcfs.fakegc", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds added to every API request (default %(default)s)",
    )
    parser.add_argument(
        "--socket-field",
        action="store_true",
        help="values also carry `socket`, as the live API does",
    )
    parser.add_argument(
        "--fixed-job-filters",
        action="store_true",
        help="answer cases/images/?job_input= and ?job_output= (the real server fails them "
        "with 500)",
    )
    parser.add_argument("--log-requests", action="store_true", help="log each request to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fake = FakeGC(demo_world(), host=args.host, port=args.port)
    fake.latency = args.latency
    fake.socket_field = args.socket_field
    fake.job_filters_fixed = args.fixed_job_filters
    fake.log_requests = args.log_requests
    with fake:
        # The token itself stays out of the output; it is gcfs.fakegc.DEMO_TOKEN.
        print(f"fake Grand Challenge at {fake.base_url}/ (API {fake.base_url}/api/v1/)")
        print(f"object store (the /media/ redirects' target) at {fake.storage_url}/")
        print("demo user: demo (token: gcfs.fakegc.DEMO_TOKEN)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping")


if __name__ == "__main__":
    main()
