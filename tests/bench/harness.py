"""Building blocks of the benchmark: worlds, mounts, RSS sampling, request accounting.

Everything here is bounded: mounts wait at most MOUNT_DEADLINE, subprocesses have timeouts,
the sampler thread stops with its event, and `Mounts.close_all()` unmounts whatever is left
(`fusermount3 -u -z`), which run.py calls in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gcfs.fakegc import DEMO_TOKEN, FakeGC, World
from gcfs.fakegc.server import RequestRecord

MOUNT_DEADLINE = 30.0  # seconds for a daemon to mount (one request plus pyfuse3.init)
UNMOUNT_DEADLINE = 15.0
MiB = 1 << 20
READER = Path(__file__).with_name("reader.py")
API_PAGE_MAX = 1000  # the API's largest page (gc-api.md §2)
GCAPI_PAGE = 100  # gcapi's iterate_all page size


# -- the machine ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "curl": shutil.which("curl") is not None,
        # Other work on the machine (a test suite running beside us) skews every number.
        "loadavg_at_start": os.getloadavg(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}, "
        f"load average {info['loadavg_at_start'][0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )


def drop_caches() -> bool:
    """Drop the kernel's page cache (root only); False when that is not allowed here."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# -- worlds ---------------------------------------------------------------------------------


@dataclass
class BenchFiles:
    """Where the benchmark's objects live in the big world."""

    items_slug: str
    item_count: int
    files_slug: str
    big_item: str  # item pk holding the big image
    big_name: str
    big_image: str  # image pk
    big_content: bytes
    reader_items: list[tuple[str, str, str]] = field(default_factory=list)  # (item, image, name)
    image_dir: str = "images/ct"  # the image socket's relative_path

    def big_path(self, mount: Path) -> Path:
        return self.item_path(mount, self.big_item, self.big_name)

    def item_path(self, mount: Path, item: str, name: str) -> Path:
        return mount / "archives" / self.files_slug / "items" / item / self.image_dir / name

    def items_dir(self, mount: Path) -> Path:
        return mount / "archives" / self.items_slug / "items"


def random_bytes(size: int, seed: str) -> bytes:
    """`size` deterministic pseudo-random bytes, materialised: the fake then serves them with
    memory copies only (GeneratedContent's SHAKE-128 makes ~400 MB/s here, which would cap
    the uncapped reads on the fake's side rather than on gcfs's)."""
    rng = random.Random(seed)
    piece = 16 * MiB
    return b"".join(rng.randbytes(min(piece, size - at)) for at in range(0, size, piece))


def bench_world(
    items: int, big_size: int, readers: int, reader_size: int
) -> tuple[World, BenchFiles]:
    w = World()
    w.add_user("demo", DEMO_TOKEN, institution="Benchmark")
    age = w.add_socket("patient-age", kind="Integer")
    ct = w.add_socket("ct-image", kind="Image", relative_path="images/ct")
    archive = w.add_archive("bench-items", "10,000 cheap items", viewers={"demo"})
    for n in range(items):
        w.add_archive_item(archive, [w.add_value(age, 20 + n % 70)], title=f"item-{n:05d}")
    files = w.add_archive("bench-files", "Large files", viewers={"demo"})
    big_name = "big.mha"
    big_content = random_bytes(big_size, "bench:big")
    big = w.add_image(big_name, [(big_name, big_content)], width=1, height=1, modality="CT")
    big_item = w.add_archive_item(files, [w.add_value(ct, image=big)], title="big")
    spec = BenchFiles(
        items_slug=archive.slug,
        item_count=items,
        files_slug=files.slug,
        big_item=big_item.pk,
        big_name=big_name,
        big_image=big.pk,
        big_content=big_content,
    )
    for n in range(readers):
        name = f"reader-{n:02d}.mha"
        content = random_bytes(reader_size, f"bench:reader:{n}")
        image = w.add_image(name, [(name, content)], width=1, height=1, modality="CT")
        item = w.add_archive_item(files, [w.add_value(ct, image=image)], title=f"reader-{n:02d}")
        spec.reader_items.append((item.pk, image.pk, name))
    return w, spec


@dataclass(frozen=True)
class CostModel:
    latency: float
    per_item_latency: float
    storage_latency: float
    storage_bandwidth: float | None  # bytes per second per connection

    def apply(self, fake: FakeGC, *, bandwidth: bool = True) -> None:
        fake.latency = self.latency
        fake.per_item_latency = self.per_item_latency
        fake.storage_latency = self.storage_latency
        fake.storage_bandwidth = self.storage_bandwidth if bandwidth else None


# -- request accounting ---------------------------------------------------------------------


class Tracker:
    """Peak concurrency on the fake: API requests inside their latency sleep, and storage
    connections that sent body bytes within the same 100 ms window."""

    WINDOW = 0.1

    def __init__(self, fake: FakeGC) -> None:
        self._lock = threading.Lock()
        self.api_now = 0
        self.api_peak = 0
        self._windows: dict[int, set[int]] = {}
        original_delay = fake._delay
        original_count = fake._count_bytes

        def delay(reply: Any) -> None:
            if not reply.is_api:
                original_delay(reply)
                return
            with self._lock:
                self.api_now += 1
                self.api_peak = max(self.api_peak, self.api_now)
            try:
                original_delay(reply)
            finally:
                with self._lock:
                    self.api_now -= 1

        def count_bytes(n: int) -> None:
            window = int(time.monotonic() / self.WINDOW)
            with self._lock:
                self._windows.setdefault(window, set()).add(threading.get_ident())
            original_count(n)

        fake._delay = delay  # type: ignore[method-assign]
        fake._count_bytes = count_bytes  # type: ignore[method-assign]

    def reset(self) -> None:
        with self._lock:
            self.api_peak = self.api_now
            self._windows.clear()

    def storage_peak(self) -> int:
        with self._lock:
            return max((len(s) for s in self._windows.values()), default=0)


def api_records(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if not r.endpoint.startswith("storage")]


def storage_records(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.endpoint.startswith("storage")]


def range_length(header: str | None) -> int | None:
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    try:
        return int(last) - int(first) + 1
    except ValueError:
        return None


def request_summary(records: list[RequestRecord]) -> dict[str, Any]:
    """Counts per endpoint, duplicates by (path, query) on the site, Range sizes on storage."""
    site = api_records(records)
    storage = storage_records(records)
    keys = Counter((r.path, tuple(sorted(r.query.items()))) for r in site)
    duplicates = {
        f"{p}?{'&'.join(f'{k}={v}' for k, v in q)}": n for (p, q), n in keys.items() if n > 1
    }
    ranges = [n for n in (range_length(r.range) for r in storage) if n is not None]
    storage_paths = Counter((r.path, r.range) for r in storage)
    return {
        "total": len(records),
        "site": len(site),
        "storage": len(storage),
        "by_endpoint": dict(Counter(r.endpoint for r in records).most_common()),
        "site_duplicates": duplicates,
        "storage_duplicates": sum(n - 1 for n in storage_paths.values() if n > 1),
        "storage_range_bytes": distribution(ranges),
        "errors": sum(1 for r in records if r.status >= 400 or r.status == 0),
    }


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "min": ordered[0],
        "p50": statistics.median(ordered),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


# -- RSS sampling ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Samples VmRSS of the watched daemons every 100 ms; keeps the peak per label."""

    INTERVAL = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, str] = {}
        self.peak: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, pid: int, label: str) -> None:
        with self._lock:
            self._watched[pid] = label
        self.sample_now()

    def unwatch(self, pid: int) -> None:
        self.sample_now()
        with self._lock:
            self._watched.pop(pid, None)

    def sample_now(self) -> None:
        with self._lock:
            watched = dict(self._watched)
        for pid, label in watched.items():
            rss = rss_bytes(pid)
            if rss is None:
                continue
            with self._lock:
                self.peak[label] = max(self.peak.get(label, 0), rss)
                self.samples[label] = self.samples.get(label, 0) + 1

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.sample_now()


# -- mounts ---------------------------------------------------------------------------------


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


class Mount:
    """`python -m gcfs mount PATH --foreground ...` in a subprocess, like tests/conftest.py."""

    def __init__(
        self,
        mounts: Mounts,
        fake: FakeGC,
        cache_dir: Path,
        label: str,
    ) -> None:
        self.mounts = mounts
        self.fake = fake
        self.cache_dir = cache_dir
        self.label = label
        self.index = mounts.next_index()
        self.path = mounts.work / f"mnt{self.index}"
        self.log_path = mounts.work / "logs" / f"daemon{self.index}-{label}.log"
        self.trace_prefix = self.log_path.with_suffix(".trace")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        self.path.mkdir()
        self.log_path.parent.mkdir(exist_ok=True)
        command = [
            *self.mounts.daemon_command,
            "mount",
            str(self.path),
            "--foreground",
            "--base-url",
            self.fake.base_url,
            "--token-file",
            str(self.mounts.token_file),
            "--cache-dir",
            str(self.cache_dir),
            "--log-level",
            self.mounts.log_level,
        ]
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.mounts.runtime_dir))
        env["GCFS_BENCH_TRACE"] = str(self.trace_prefix)  # read by trace_ops.py only
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        self.mounts.live.append(self)
        end = time.monotonic() + MOUNT_DEADLINE
        while not os.path.ismount(self.path):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gcfs exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > end:
                raise RuntimeError(f"gcfs did not mount within {MOUNT_DEADLINE} s")
            time.sleep(0.01)
        self.mounts.sampler.watch(self.process.pid, self.label)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            self.mounts.sampler.unwatch(self.process.pid)
        if os.path.ismount(self.path) or (self.path.exists() and _is_stale(self.path)):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.path)], check=False, timeout=UNMOUNT_DEADLINE
            )
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=UNMOUNT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=UNMOUNT_DEADLINE)
        if self in self.mounts.live:
            self.mounts.live.remove(self)
        self.mounts.check_log(self)
        if self.process is not None:
            trace = Path(f"{self.trace_prefix}.{self.process.pid}.json")
            with contextlib.suppress(OSError, ValueError):
                self.mounts.traces.append({"label": self.label, **json.loads(trace.read_text())})

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Mounts:
    """Every mount of a run: numbering, the token file, problems found in daemon logs."""

    def __init__(
        self, work: Path, sampler: RssSampler, daemon_command: list[str], log_level: str = "INFO"
    ) -> None:
        self.work = work
        self.log_level = log_level
        self.sampler = sampler
        self.daemon_command = daemon_command
        self.live: list[Mount] = []
        self.log_problems: list[str] = []
        self.traces: list[dict[str, Any]] = []  # from trace_ops.py daemons (--trace-ops)
        self._index = 0
        self._caches = 0
        self.runtime_dir = work / "run"
        self.runtime_dir.mkdir(mode=0o700)
        self.token_file = work / "token"
        self.token_file.write_text(f"Bearer {DEMO_TOKEN}\n", encoding="utf-8")
        self.token_file.chmod(0o600)

    def next_index(self) -> int:
        self._index += 1
        return self._index

    def fresh_cache(self) -> Path:
        self._caches += 1
        return self.work / f"cache{self._caches}"

    def mount(self, fake: FakeGC, label: str, cache_dir: Path | None = None) -> Mount:
        return Mount(self, fake, cache_dir or self.fresh_cache(), label)

    def check_log(self, mount: Mount) -> None:
        text = mount.log_text()
        if DEMO_TOKEN in text:
            self.log_problems.append(f"{mount.log_path.name}: the token appears in the log")
        for line in text.splitlines():
            if " ERROR " in line or "Traceback" in line or "CRITICAL" in line:
                self.log_problems.append(f"{mount.log_path.name}: {line[:300]}")

    def close_all(self) -> None:
        for mount in list(self.live):
            with contextlib.suppress(Exception):
                mount.stop()


# -- running things -------------------------------------------------------------------------


def timed_run(
    command: list[str], timeout: float, **kwargs: Any
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    started = time.perf_counter()
    done = subprocess.run(command, timeout=timeout, check=False, **kwargs)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        err = (done.stderr or b"")[-2000:].decode(errors="replace") if done.stderr else ""
        raise RuntimeError(f"{command[0]} exited with {done.returncode}: {err}")
    return elapsed, done


def reader_command(*args: str) -> list[str]:
    return [sys.executable, str(READER), *args]


def run_readers(commands: list[list[str]], timeout: float) -> list[dict[str, Any]]:
    """Run reader processes at once; their JSON outputs, in order."""
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands
    ]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            remaining = max(1.0, deadline - time.monotonic())
            out, err = process.communicate(timeout=remaining)
            if process.returncode != 0:
                raise RuntimeError(f"reader failed: {err.decode(errors='replace')[-2000:]}")
            results.append(json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return results


def gcapi_iterate_all(
    client: httpx.Client, url: str, params: dict[str, str] | None = None, max_pages: int = 100_000
) -> tuple[list[Any], int]:
    """gcapi's `iterate_all`: pages of 100, offset += 100 until an empty page (gc-api.md §2)."""
    results: list[Any] = []
    offset = 0
    requests = 0
    for _ in range(max_pages):
        response = client.get(url, params={**(params or {}), "limit": GCAPI_PAGE, "offset": offset})
        requests += 1
        response.raise_for_status()
        page = response.json()["results"]
        if not page:
            break
        results += page
        offset += GCAPI_PAGE
    return results, requests


def api_client(fake: FakeGC) -> httpx.Client:
    return httpx.Client(
        base_url=fake.base_url + "/api/v1/",
        headers={"Authorization": f"Bearer {DEMO_TOKEN}", "Accept": "application/json"},
        timeout=60,
    )


def signed_url(fake: FakeGC, image_pk: str) -> str:
    """The presigned storage URL of an image's first file, as /media/ hands it out."""
    with api_client(fake) as client:
        image = client.get(f"cases/images/{image_pk}/").raise_for_status().json()
        media = image["files"][0]["file"]
        response = client.get(media, follow_redirects=False)
        if response.status_code != 302:
            raise RuntimeError(f"/media/ answered {response.status_code}")
        return response.headers["location"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def each_rep(repeat: int) -> Iterator[int]:
    yield from range(max(1, repeat))


def safe(fn: Callable[[], Any]) -> Any:
    with contextlib.suppress(Exception):
        return fn()
    return None
