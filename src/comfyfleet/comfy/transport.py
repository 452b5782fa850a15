"""The HTTP side of a :class:`~comfyfleet.comfy.client.ComfyClient`: calls to one ComfyUI server, answers read
whole (or streamed from ``/view``), the transport's failures as the client's errors, and the batched deletes of
finished prompts' history entries.

aiohttp rather than httpx: a call costs the control plane about a fifth of the CPU (0.12 against 0.59 ms on
the project's machine), and a task makes several of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from comfyfleet.background import Background
from comfyfleet.comfy.errors import (
    ComfyError,
    ComfyTimeout,
    OutputNotFound,
    UnexpectedResponse,
    WorkerUnreachable,
)

logger = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}
_DOWNLOAD_CHUNK = 256 * 1024
# History deletes of finished prompts go in batches: one call per this many prompts, or after this long.
FORGET_BATCH = 32
FORGET_LINGER_S = 1.0
_FORGET_CLOSE_S = 2.0


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole HTTP answer of the server (every call but ``/view`` reads its body at once)."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True, slots=True)
class Download:
    """A file streaming from ``/view``: its content type and its bytes."""

    content_type: str
    chunks: AsyncIterator[bytes]

    async def read(self) -> bytes:
        """The whole file (for small ones)."""
        return b"".join([chunk async for chunk in self.chunks])


class Transport:
    """One aiohttp session on one server; open while its client is."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        self._forgotten: list[str] = []  # prompts whose history entries are to be deleted
        self._forget_timer: asyncio.TimerHandle | None = None
        self._forgetting = Background()

    def open(self) -> None:
        # The proxy settings of the environment (HTTP_PROXY, NO_PROXY…) are read once for this server, not
        # on every call as aiohttp's trust_env does (in a thread, which costs more than the call).
        with contextlib.suppress(LookupError):
            self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(self.base_url))
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        )

    async def close(self) -> None:
        """Send the history deletes still waiting (a server that went away does not hold this up), then close."""
        self._flush_forgotten()
        await self._forgetting.settle(_FORGET_CLOSE_S)
        if self._session is not None:
            await self._session.close()

    def _open_session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the client checks it is open first"
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: aiohttp.FormData | None = None,
    ) -> Answer:
        """One call, its answer read whole. ``body`` is sent as JSON."""
        content = None if body is None else json.dumps(body)
        with self._errors(method, path):
            async with self._open_session().request(
                method,
                self.base_url + path,
                data=data if data is not None else content,
                headers=None if body is None else _JSON_HEADERS,
            ) as response:
                return Answer(response.status, await response.read())

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.request(method, path, body=body)
        if response.status_code != 200:
            raise UnexpectedResponse(method, path, response.status_code, response.text)
        try:
            return response.json()
        except ValueError as exc:
            raise UnexpectedResponse(method, path, response.status_code, response.text) from exc

    async def post_empty(self, path: str, body: dict[str, Any]) -> None:
        response = await self.request("POST", path, body=body)
        if response.status_code != 200:
            raise UnexpectedResponse("POST", path, response.status_code, response.text)

    @contextlib.asynccontextmanager
    async def download(self, filename: str, subfolder: str, kind: str) -> AsyncIterator[Download]:
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        with self._errors("GET", "/view"):
            async with self._open_session().get(self.base_url + "/view", params=params) as response:
                if response.status == 404:
                    raise OutputNotFound(filename, subfolder, kind)
                if response.status != 200:
                    text = (await response.read()).decode("utf-8", "replace")
                    raise UnexpectedResponse("GET", "/view", response.status, text)
                content_type = response.headers.get("Content-Type") or ""
                yield Download(content_type, response.content.iter_chunked(_DOWNLOAD_CHUNK))

    @contextlib.contextmanager
    def _errors(self, method: str, path: str) -> Iterator[None]:
        """The transport's failures as the client's errors."""
        try:
            yield
        except aiohttp.ConnectionTimeoutError as exc:
            raise WorkerUnreachable(f"{method} {self.base_url}{path}: connect timed out") from exc
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors too
            raise ComfyTimeout(f"{method} {self.base_url}{path}: no answer within {self.timeout}s") from exc
        except aiohttp.ClientError as exc:
            raise WorkerUnreachable(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    # -- history deletes, in batches ---------------------------------------------------------------------
    def delete_history_later(self, prompt_id: str) -> None:
        self._forgotten.append(prompt_id)
        if len(self._forgotten) >= FORGET_BATCH:
            self._flush_forgotten()
        elif self._forget_timer is None:
            self._forget_timer = asyncio.get_running_loop().call_later(FORGET_LINGER_S, self._flush_forgotten)

    def _flush_forgotten(self) -> None:
        if self._forget_timer is not None:
            self._forget_timer.cancel()
            self._forget_timer = None
        if not self._forgotten or self._session is None or self._session.closed:
            return
        batch, self._forgotten = self._forgotten, []
        self._forgetting.start(self._delete_quietly(batch))

    async def _delete_quietly(self, prompt_ids: list[str]) -> None:
        try:
            await self.post_empty("/history", {"delete": prompt_ids})
        except ComfyError as exc:
            logger.debug(
                "history_delete_failed worker=%s prompts=%d: %s", self.base_url, len(prompt_ids), exc
            )
