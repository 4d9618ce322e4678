"""Reader processes of the benchmark; each prints one JSON object on stdout.

    python reader.py seq PATH START_AT [CHUNK]       read PATH to its end (like cat)
    python reader.py url URL START_AT [CHUNK]        stream URL to its end (no Range)
    python reader.py random PATH COUNT SIZE SEED     COUNT preads of SIZE bytes at random offsets
    python reader.py epoch LIST WORKER WORKERS START_AT
                                    one worker of a training loader: reads whole files, the
                                    lines WORKER, WORKER + WORKERS, ... of the file LIST
    python reader.py download LIST THREADS START_AT
                                    downloads each "<signed URL>\t<output path>" line of LIST,
                                    THREADS at once, each on its own keep-alive connection
                                    (the benchmark's fallback where curl is missing)
    python reader.py scan DIR first|all              os.scandir(DIR): the time to its first
                                    entry, and with "all" to its last; stops after the first
                                    entry with "first" (closing the directory)
    python reader.py probe ls|stat PATH              `ls -l` (scandir, then lstat of each entry)
                                    or `stat` of PATH: the time taken and the outcome, "ok" or
                                    the errno's name (EIO, ENOENT, ...)

START_AT is a time.monotonic() value (CLOCK_MONOTONIC is system-wide): the reader sleeps
until then, so that many readers start together however long their interpreters took to
start. Standard library only; the readers never touch the fake server's process.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import queue
import random
import sys
import threading
import time
import urllib.parse

DEFAULT_CHUNK = 128 * 1024  # what coreutils cat asks for
DOWNLOAD_CHUNK = 1 << 20  # a downloader writes its files in pieces of this size


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
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
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


def read_epoch(list_file: str, worker: int, workers: int, start_at: float) -> dict[str, float]:
    """Whole-file reads, as a data loader's worker does them (`open(path, "rb").read()`)."""
    with open(list_file, encoding="utf-8") as f:
        mine = f.read().splitlines()[worker::workers]
    _wait_until(start_at)
    start = time.monotonic()
    total = 0
    for path in mine:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return {"bytes": total, "files": len(mine), "start": start, "end": time.monotonic()}


def _download_one(connection: http.client.HTTPConnection, url: str, output: str) -> int:
    parts = urllib.parse.urlsplit(url)
    connection.request("GET", parts.path + "?" + parts.query)
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the signed URL answered {response.status}")
    written = 0
    with open(output, "wb") as out:
        while data := response.read(DOWNLOAD_CHUNK):
            written += out.write(data)
    return written


def download(list_file: str, threads: int, start_at: float) -> dict[str, object]:
    work: queue.Queue[tuple[str, str]] = queue.Queue()
    with open(list_file, encoding="utf-8") as f:
        for line in f.read().splitlines():
            url, output = line.split("\t")
            work.put((url, output))
    totals = {"bytes": 0, "files": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        connection: http.client.HTTPConnection | None = None
        try:
            while True:
                try:
                    url, output = work.get_nowait()
                except queue.Empty:
                    return
                if connection is None:
                    parts = urllib.parse.urlsplit(url)
                    connection = http.client.HTTPConnection(
                        parts.hostname or "", parts.port, timeout=60
                    )
                written = _download_one(connection, url, output)
                with lock:
                    totals["bytes"] += written
                    totals["files"] += 1
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if connection is not None:
                connection.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    _wait_until(start_at)
    start = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    end = time.monotonic()
    if errors:
        raise SystemExit(f"download failed: {errors[0]}")
    return {**totals, "start": start, "end": end}


def scan(path: str, until: str) -> dict[str, object]:
    start = time.monotonic()
    first = None
    entries = 0
    with os.scandir(path) as it:
        for _ in it:
            entries += 1
            if first is None:
                first = time.monotonic() - start
                if until == "first":
                    break
    return {"first_s": first, "all_s": time.monotonic() - start, "entries": entries}


def probe(op: str, path: str) -> dict[str, object]:
    start = time.monotonic()
    entries = 0
    outcome = "ok"
    try:
        if op == "ls":
            with os.scandir(path) as it:
                for entry in it:
                    entry.stat(follow_symlinks=False)
                    entries += 1
        else:
            os.stat(path)
    except OSError as exc:
        outcome = errno_name(exc.errno)
    return {"s": time.monotonic() - start, "outcome": outcome, "entries": entries}


def errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, f"errno {number}")


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
    elif mode == "epoch":
        result = dict(read_epoch(argv[2], int(argv[3]), int(argv[4]), float(argv[5])))
    elif mode == "download":
        result = download(argv[2], int(argv[3]), float(argv[4]))
    elif mode == "scan":
        result = scan(argv[2], argv[3])
    elif mode == "probe":
        result = probe(argv[2], argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
