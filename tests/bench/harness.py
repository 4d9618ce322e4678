"""Building blocks of the benchmark: worlds, mounts, RSS sampling, request accounting.

Everything here is bounded: mounts wait at most MOUNT_DEADLINE, subprocesses have timeouts,
the sampler thread stops with its event, and `Mounts.close_all()` unmounts whatever is left
(`fusermount3 -u -z`), which run.py calls in a `finally`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gcfs.fakegc import DEMO_TOKEN, FakeGC, GeneratedContent, ImageFile, World
from gcfs.fakegc.server import RequestRecord
from gcfs.fakegc.storage import image_file_key
from gcfs.fakegc.world import Content, content_read

MOUNT_DEADLINE = 30.0  # seconds for a daemon to mount (one request plus pyfuse3.init)
UNMOUNT_DEADLINE = 15.0
MiB = 1 << 20
KiB = 1 << 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of utime and stime in /proc/<pid>/stat
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
        "rclone": rclone_version(),
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


def rclone_version() -> str | None:
    """rclone's version line (e.g. "rclone v1.60.1-DEV"), None if it is not installed."""
    if shutil.which("rclone") is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["rclone", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.splitlines()[0] if done.stdout else "rclone (version unknown)"
    return "rclone (version unknown)"


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of process `pid`, all its threads, from /proc/<pid>/stat; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children (curl runs in between)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    sets: dict[str, FileSet] = field(default_factory=dict)  # by name: epoch, small, prefetch

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


@dataclass(frozen=True)
class SetSpec:
    """`count` files of `size` bytes, one image per item of their own archive."""

    count: int
    size: int
    generated: bool  # GeneratedContent (computed when served) instead of bytes held in memory


@dataclass
class FileSet:
    """Files of one size in their own archive (the epoch, small-file and prefetch rows)."""

    slug: str
    size: int
    files: list[tuple[str, ImageFile]]  # (item pk, the image's one file)
    image_dir: str = "images/ct"

    def items_dir(self, mount: Path) -> Path:
        return mount / "archives" / self.slug / "items"

    def paths(self, mount: Path) -> list[Path]:
        return [self.items_dir(mount) / item / self.image_dir / f.name for item, f in self.files]

    def signed_urls(self, fake: FakeGC) -> list[str]:
        """Signed storage URLs of these files, as /media/ would hand them out, made by the fake
        without a request: the baselines start their clocks with the URLs known, as gcfs
        starts its own after the loader's listing (which resolves them for the sizes)."""
        return [fake.presign(image_file_key(f.image_pk, f.pk, f.name)) for _, f in self.files]

    @property
    def total(self) -> int:
        return self.size * len(self.files)


def add_file_set(w: World, name: str, spec: SetSpec, socket: str) -> FileSet:
    archive = w.add_archive(
        f"bench-{name}", f"{spec.count} files for one benchmark row", viewers={"demo"}
    )
    found: list[tuple[str, ImageFile]] = []
    for n in range(spec.count):
        file_name = f"{name}-{n:05d}.mha"
        seed = f"bench:{name}:{n}"
        content: Content = (
            GeneratedContent(spec.size, seed) if spec.generated else random_bytes(spec.size, seed)
        )
        image = w.add_image(file_name, [(file_name, content)], width=1, height=1, modality="CT")
        item = w.add_archive_item(archive, [w.add_value(socket, image=image)], title=file_name)
        found.append((item.pk, image.files[0]))
    return FileSet(slug=archive.slug, size=spec.size, files=found)


def file_bytes(f: ImageFile) -> bytes:
    return content_read(f.content, 0, len(f.content))


def bench_world(
    items: int,
    big_size: int,
    readers: int,
    reader_size: int,
    sets: dict[str, SetSpec] | None = None,
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
    for set_name, set_spec in (sets or {}).items():
        spec.sets[set_name] = add_file_set(w, set_name, set_spec, "ct-image")
    return w, spec


@dataclass
class ScaleFiles:
    """The archives of generated items of scenarios 12-15, on a fake of their own."""

    listing: dict[str, int]  # slug -> items: scenario 12 lists each, 13 and 14 the first
    down: tuple[str, int]  # scenario 15's archive (slug, items)

    @property
    def counts(self) -> dict[str, int]:
        return {**self.listing, self.down[0]: self.down[1]}

    def items_dir(self, mount: Path, slug: str) -> Path:
        return mount / "archives" / slug / "items"


def scale_world(counts: dict[str, int]) -> World:
    """Archives of `counts[slug]` generated items each (World.add_generated_items: one Value
    each, like bench_world's cheap items), all visible to demo; built in microseconds."""
    w = World()
    w.add_user("demo", DEMO_TOKEN, institution="Benchmark")
    age = w.add_socket("patient-age", kind="Integer")
    for slug, count in counts.items():
        archive = w.add_archive(slug, f"{count} generated items", viewers={"demo"})
        w.add_generated_items(archive, count, age)
    return w


@dataclass(frozen=True)
class CostModel:
    latency: float
    per_item_latency: float
    storage_latency: float
    storage_bandwidth: float | None  # bytes per second per connection
    media_latency: float = 0.0  # per /media/ request: a round trip to the site, like the API's

    def apply(self, fake: FakeGC, *, bandwidth: bool = True) -> None:
        fake.latency = self.latency
        fake.per_item_latency = self.per_item_latency
        fake.media_latency = self.media_latency
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


def distribution(values: Sequence[float]) -> dict[str, float]:
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
    """A FUSE mount whose daemon died: stat fails with ENOTCONN (Path.exists() would raise)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


class Mount:
    """`python -m gcfs mount PATH --foreground ...` in a subprocess, like tests/conftest.py."""

    def __init__(
        self,
        mounts: Mounts,
        fake: FakeGC,
        cache_dir: Path,
        label: str,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.mounts = mounts
        self.fake = fake
        self.cache_dir = cache_dir
        self.label = label
        self.extra_args = extra_args  # more `gcfs mount` flags, e.g. ("--ttl", "600")
        self.env = env or {}  # more environment, e.g. a fresh XDG_CACHE_HOME
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
            *self.extra_args,
        ]
        env = {**self.mounts.environment(), **self.env}
        env["GCFS_BENCH_TRACE"] = str(self.trace_prefix)  # read by trace_ops.py only
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        self.mounts.live.append(self)
        wait_for_mount(self.path, self.process, "gcfs", self.log_text)
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

    def kill(self) -> None:
        """SIGKILL the daemon: its pending FUSE requests fail (ENOTCONN), which frees a process
        stuck in one; the mount stays stale until stop() unmounts it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=UNMOUNT_DEADLINE)

    def stop(self) -> None:
        if self.process is not None:
            self.mounts.sampler.unwatch(self.process.pid)
        unmount(self.path, self.process)
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


def wait_for_mount(
    path: Path, process: subprocess.Popen[bytes], name: str, log: Callable[[], str]
) -> None:
    end = time.monotonic() + MOUNT_DEADLINE
    while not os.path.ismount(path):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        if time.monotonic() > end:
            raise RuntimeError(f"{name} did not mount within {MOUNT_DEADLINE} s")
        time.sleep(0.01)


def unmount(path: Path, process: subprocess.Popen[bytes] | None) -> None:
    """`fusermount3 -u -z`, then wait for the server to exit (killed after the deadline)."""
    if os.path.ismount(path) or _is_stale(path):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(path)], check=False, timeout=UNMOUNT_DEADLINE
        )
    if process is not None and process.poll() is None:
        try:
            process.wait(timeout=UNMOUNT_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=UNMOUNT_DEADLINE)


class RcloneMount:
    """The peer: `rclone mount :http: PATH --http-url URL --vfs-cache-mode off --read-only`,
    the http remote over the fake store's plain view (FakeGC.plain_storage_view). No VFS
    cache, so it streams from storage like gcfs on a cold cache; an empty config file of its
    own, so that nothing in ~/.config/rclone changes what it does."""

    def __init__(self, mounts: Mounts, url: str, label: str) -> None:
        self.mounts = mounts
        self.url = url
        self.label = label
        self.index = mounts.next_index()
        self.path = mounts.work / f"mnt{self.index}"
        self.log_path = mounts.work / "logs" / f"rclone{self.index}-{label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        config = self.mounts.work / "rclone.conf"
        config.touch()
        return [
            "rclone",
            "mount",
            ":http:",
            str(self.path),
            "--http-url",
            self.url,
            "--vfs-cache-mode",
            "off",
            "--read-only",
            "--config",
            str(config),
            "--cache-dir",
            str(self.mounts.work / "rclone-cache"),
            "--log-file",
            str(self.log_path),
            "--log-level",
            "INFO",
        ]

    def start(self) -> RcloneMount:
        self.path.mkdir()
        self.log_path.parent.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.mounts.live.append(self)
        wait_for_mount(self.path, self.process, "rclone", self.log_text)
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
        unmount(self.path, self.process)
        if self in self.mounts.live:
            self.mounts.live.remove(self)
        for line in self.log_text().splitlines():
            if "ERROR" in line or "CRITICAL" in line:
                self.mounts.log_problems.append(f"{self.log_path.name}: {line[:300]}")

    def __enter__(self) -> RcloneMount:
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
        self.live: list[Mount | RcloneMount] = []
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

    def fresh_xdg_cache(self) -> dict[str, str]:
        """A new, empty $XDG_CACHE_HOME for one daemon: gcfs keeps its metadata under
        $XDG_CACHE_HOME (gcfs-metadata, issue 15), so a cold mount needs a fresh one."""
        self._caches += 1
        home = self.work / f"xdg-cache{self._caches}"
        home.mkdir(mode=0o700)
        return {"XDG_CACHE_HOME": str(home)}

    def mount(
        self,
        fake: FakeGC,
        label: str,
        cache_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Mount:
        return Mount(self, fake, cache_dir or self.fresh_cache(), label, extra_args, env)

    def environment(self) -> dict[str, str]:
        """For gcfs's processes: daemons, and `gcfs prefetch`, which finds its daemon's
        control socket in $XDG_RUNTIME_DIR/gcfs."""
        return dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime_dir))

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


# -- many files: a loader's listing, its workers, a download script ---------------------------


def walk_files(root: Path, suffix: str) -> list[Path]:
    """The files below `root` whose names end with `suffix`, as a loader's glob finds them
    (os.walk: readdir only; item.json and the like are left out)."""
    found = [Path(d) / n for d, _, names in os.walk(root) for n in names if n.endswith(suffix)]
    return sorted(found)


def shuffled(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def span(results: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes, files and wall time of processes that started together: first start to last end."""
    return {
        "bytes": sum(r["bytes"] for r in results),
        "files": sum(r["files"] for r in results),
        "s": max(r["end"] for r in results) - min(r["start"] for r in results),
    }


def start_time(processes: int) -> float:
    """When processes started now should begin together: after their interpreters are up."""
    return time.monotonic() + 1.0 + 0.05 * processes


def read_epoch(
    paths: list[Path], workers: int, list_file: Path, timeout: float
) -> dict[str, float]:
    """`workers` processes read `paths` whole, worker w the paths w, w + workers, ...: the
    way a training loader's workers share a shuffled epoch."""
    list_file.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    at = repr(start_time(workers))
    commands = [
        reader_command("epoch", str(list_file), str(w), str(workers), at) for w in range(workers)
    ]
    return span(run_readers(commands, timeout))


def download(
    urls: list[str], outputs: list[Path], parallel: int, list_file: Path, timeout: float
) -> dict[str, Any]:
    """Download signed URLs to `outputs`, `parallel` at a time: `curl -Z --parallel-max N` (or
    one after another for 1), else reader.py's threads. The tool's wall time, its bytes on disk."""
    if shutil.which("curl"):
        list_file.write_text(
            "".join(f'url = "{u}"\noutput = "{o}"\n' for u, o in zip(urls, outputs, strict=True)),
            encoding="utf-8",
        )
        command = ["curl", "-sS", "--fail", "-K", str(list_file)]
        if parallel > 1:
            command += ["-Z", "--parallel-max", str(parallel)]
        seconds, _ = timed_run(command, timeout, capture_output=True)
        tool = "curl" + (f" -Z --parallel-max {parallel}" if parallel > 1 else "")
    else:
        list_file.write_text(
            "".join(f"{u}\t{o}\n" for u, o in zip(urls, outputs, strict=True)), encoding="utf-8"
        )
        command = reader_command("download", str(list_file), str(parallel), repr(start_time(1)))
        seconds = span(run_readers([command], timeout))["s"]
        tool = f"python http.client, {parallel} threads"
    list_file.unlink()
    on_disk = sum(o.stat().st_size for o in outputs if o.exists())
    return {"bytes": on_disk, "files": len(outputs), "s": seconds, "tool": tool}
