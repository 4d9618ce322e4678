"""Storage answers that are not data (issue 14: 16): a redirect is followed once; a 401/403
re-resolves the /media/ URL once, then EACCES (403) or EIO (401); none of them costs the retry
budget. The tests count requests, never time: the budget is an hour, so a retry loop would
show as a timeout of the test's own deadline."""

from __future__ import annotations

import httpx
import pytest
import trio

from gcfs.content import ContentStore
from gcfs.errors import GcfsError, PermissionDenied, Unavailable
from gcfs.retry import RetryPolicy
from tests.rawhttp import RawServer, Request, response

MiB = 1 << 20
BODY = bytes(range(256)) * 8192  # 2 MiB
SIZE = 300 * 1024  # above RANDOM_READ_MAX: the block path


def storage(block_answer: str, *, probe_redirect: bool = False) -> tuple[RawServer, list[str]]:
    """/media/x -> 302 /obj?sig=N; /obj answers the size probe (or, `probe_redirect`, sends
    it to /real with a 307), and block ranges as `block_answer` says: "ok" (the bytes), "redirect"
    (307 to /real), "loop" (302 to itself), or a status."""
    targets: list[str] = []
    resolutions = 0

    def ranged(request: Request) -> bytes:
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        headers = {"Content-Range": f"bytes {first}-{last}/{len(BODY)}"}
        return response(206, BODY[first : last + 1], headers)

    def handler(request: Request) -> bytes:
        nonlocal resolutions
        targets.append(request.target.partition("?")[0])
        if request.target.startswith("/media/"):
            resolutions += 1
            return response(302, headers={"Location": f"/obj?sig={resolutions}"})
        probe = request.headers["range"] == "bytes=0-0"
        if probe and probe_redirect and request.target.startswith("/obj"):
            return response(307, headers={"Location": "/real?sig=p"})
        if request.target.startswith("/real") or probe:
            return ranged(request)
        if block_answer == "ok":
            return ranged(request)
        if block_answer == "redirect":
            return response(307, headers={"Location": "/real?sig=r"})
        if block_answer == "loop":
            return response(302, headers={"Location": "/obj?sig=again"})
        return response(int(block_answer), b"<Error/>")

    return RawServer(handler), targets


async def read(server: RawServer) -> bytes | GcfsError:
    """The bytes, or the error the read raised (caught inside the store's nurseries)."""
    retry = RetryPolicy(budget=3600.0)
    async with (
        httpx.AsyncClient() as http,
        ContentStore(http, {"Authorization": "Bearer x"}, None, retry=retry) as store,
    ):
        f = await store.open(f"{server.url}/media/x")
        try:
            with trio.fail_after(30):  # far above a request or two; far below the budget
                return bytes(await f.read(BS_OFFSET, SIZE))
        except GcfsError as exc:
            return exc
        finally:
            f.close()


BS_OFFSET = MiB + 5


async def test_a_redirect_is_followed_once() -> None:
    server, targets = storage("redirect")
    with server:
        assert await read(server) == BODY[BS_OFFSET : BS_OFFSET + SIZE]
    assert targets == ["/media/x", "/obj", "/obj", "/real"]  # resolve, probe, 307, the bytes


async def test_a_redirected_size_probe_is_followed_once() -> None:
    server, targets = storage("ok", probe_redirect=True)
    with server:
        assert await read(server) == BODY[BS_OFFSET : BS_OFFSET + SIZE]
    assert targets[:3] == ["/media/x", "/obj", "/real"]  # resolve, probe, its one redirect


async def test_a_redirect_loop_is_eio_after_one_hop() -> None:
    server, targets = storage("loop")
    with server:
        assert isinstance(await read(server), Unavailable)
    assert targets == ["/media/x", "/obj", "/obj", "/obj"]


@pytest.mark.parametrize(
    ("status", "error"), [(401, Unavailable), (403, PermissionDenied)], ids=["401", "403"]
)
async def test_401_and_403_resolve_once_then_fail(status: int, error: type[Exception]) -> None:
    server, targets = storage(str(status))
    with server:
        assert type(await read(server)) is error
    # resolve, probe, the refused GET, one fresh resolution, refused again: no retry loop.
    assert targets == ["/media/x", "/obj", "/obj", "/media/x", "/obj"]
