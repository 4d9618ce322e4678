"""Reader processes of the benchmark; each prints one JSON object on stdout.

    python reader.py seq PATH START_AT [CHUNK]       read PATH to its end (like cat)
    python reader.py url URL START_AT [CHUNK]        stream URL to its end (no Range)
    python reader.py random PATH COUNT SIZE SEED     COUNT preads of SIZE bytes at random offsets

START_AT is a time.monotonic() value (CLOCK_MONOTONIC is system-wide): the reader sleeps
until then, so that many readers start together however long their interpreters took to
start. Standard library only; the readers never touch the fake server's process.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import sys
import time
import urllib.parse

DEFAULT_CHUNK = 128 * 1024  # what coreutils cat asks for


def _wait_until(start_at: float) -> None:
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(min(delay, 30.0))


def read_file(path: str, start_at: float, chunk: int) -> dict[str, float]:
    _wait_until(start_at)
    start = time.monotonic()
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            data = os.read(fd, chunk)
            if not data:
                break
            total += len(data)
    finally:
        os.close(fd)
    return {"bytes": total, "start": start, "end": time.monotonic()}


def read_url(url: str, start_at: float, chunk: int) -> dict[str, float]:
    parts = urllib.parse.urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    _wait_until(start_at)
    start = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    total = 0
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"GET answered {response.status}")
        while True:
            data = response.read(chunk)
            if not data:
                break
            total += len(data)
    finally:
        connection.close()
    return {"bytes": total, "start": start, "end": time.monotonic()}


def read_random(path: str, count: int, size: int, seed: int) -> dict[str, object]:
    fd = os.open(path, os.O_RDONLY)
    latencies = []
    total = 0
    offsets = []
    try:
        file_size = os.fstat(fd).st_size
        rng = random.Random(seed)
        for _ in range(count):
            offset = rng.randrange(0, max(1, file_size - size))
            started = time.perf_counter()
            data = os.pread(fd, size, offset)
            latencies.append(time.perf_counter() - started)
            total += len(data)
            offsets.append(offset)
    finally:
        os.close(fd)
    return {"bytes": total, "latencies": latencies, "offsets": offsets}


def main(argv: list[str]) -> int:
    mode = argv[1]
    if mode == "seq":
        chunk = int(argv[4]) if len(argv) > 4 else DEFAULT_CHUNK
        result: dict[str, object] = dict(read_file(argv[2], float(argv[3]), chunk))
    elif mode == "url":
        chunk = int(argv[4]) if len(argv) > 4 else DEFAULT_CHUNK
        result = dict(read_url(argv[2], float(argv[3]), chunk))
    elif mode == "random":
        result = read_random(argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
