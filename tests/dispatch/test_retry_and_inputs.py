from __future__ import annotations

import asyncio
import base64
import random
import socket

import httpx
import pytest

from comfyfleet.dispatch.inputs import InputError, check_input_spec, fetch_url, rewrite_graph
from comfyfleet.dispatch.retry import backoff_s, classify_execution_error, sanitize_execution_error


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    values = [backoff_s(n, base_s=1.0, max_s=60.0, rng=rng) for n in range(10)]
    for n, value in enumerate(values):
        ceiling = min(60.0, 2.0**n)
        assert ceiling / 2 <= value <= ceiling
    assert values[-1] <= 60.0


def test_oom_is_retryable_node_error_is_not() -> None:
    assert (
        classify_execution_error(
            {"exception_type": "torch.OutOfMemoryError", "exception_message": "Allocation on device"}
        )
        == "out_of_memory"
    )
    assert (
        classify_execution_error({"exception_type": "ValueError", "exception_message": "bad"}) == "node_error"
    )


def test_sanitized_error_drops_traceback_and_inputs() -> None:
    message, details = sanitize_execution_error(
        {
            "node_id": "9",
            "node_type": "SaveImage",
            "exception_message": "boom",
            "exception_type": "Exception",
            "traceback": ["/srv/comfy/x.py line 1"],
            "current_inputs": {"images": "tensor"},
        }
    )
    assert message == "SaveImage (node 9): boom"
    assert "traceback" not in details
    assert "current_inputs" not in details


@pytest.mark.parametrize(
    "spec",
    [
        "x",
        {"name": "../etc/passwd", "data": ""},
        {"name": "a/b.png", "data": ""},
        {"name": "a.png"},
        {"name": "a.png", "data": "aGk=", "url": "http://example.com/a.png"},
        {"name": "a.png", "data": "not base64!"},
        {"name": "a.png", "url": "ftp://example.com/a.png"},
    ],
)
def test_bad_input_specs_rejected(spec: object) -> None:
    with pytest.raises(InputError):
        check_input_spec(spec, max_bytes=1000)


def test_input_over_size_rejected() -> None:
    with pytest.raises(InputError, match="larger than"):
        check_input_spec({"name": "a.png", "data": base64.b64encode(b"x" * 2000).decode()}, max_bytes=1000)


def test_rewrite_graph_points_inputs_at_uploaded_path() -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "X", "inputs": {"v": 3}},
    }
    rewritten = rewrite_graph(graph, {"cat.png": "comfyfleet/t1/cat.png"})
    assert rewritten["1"]["inputs"]["image"] == "comfyfleet/t1/cat.png"
    assert graph["1"]["inputs"]["image"] == "cat.png"


async def test_loopback_url_refused_unless_allowed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"png-bytes")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(InputError, match="non-public"):
            await fetch_url(client, "http://127.0.0.1:9/x.png", max_bytes=100, allow_private=False)
        with pytest.raises(InputError, match="non-public"):
            await fetch_url(client, "http://10.1.2.3/x.png", max_bytes=100, allow_private=False)
        assert (
            await fetch_url(client, "http://127.0.0.1:9/x.png", max_bytes=100, allow_private=True)
            == b"png-bytes"
        )


async def test_redirect_to_private_address_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "93.184.215.14":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})
        return httpx.Response(200, content=b"secret")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(InputError, match="non-public"):
            await fetch_url(client, "http://93.184.215.14/x.png", max_bytes=100, allow_private=False)


async def test_size_cap_while_streaming() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 500)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(InputError, match="larger than"):
            await fetch_url(client, "http://127.0.0.1/x.png", max_bytes=100, allow_private=True)


async def test_fetch_is_pinned_to_the_address_that_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # No DNS here: the resolver answers for a made-up name, as a rebinding attacker's first answer would.
    loop = asyncio.get_running_loop()

    async def resolve(host: str, port: object, **kwargs: object) -> list[tuple[object, ...]]:
        assert host == "cdn.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"png-bytes")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        data = await fetch_url(client, "https://cdn.example/cat.png?x=1", max_bytes=100, allow_private=False)
    assert data == b"png-bytes"
    # The connection goes to the checked address; the name is kept for Host and the certificate (SNI).
    assert seen[0].url.host == "93.184.215.14"
    assert seen[0].url.path == "/cat.png"
    assert seen[0].url.query == b"x=1"
    assert seen[0].headers["host"] == "cdn.example"
    assert seen[0].extensions["sni_hostname"] == "cdn.example"
