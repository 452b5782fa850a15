"""``/prompt``, ``/queue``, ``/interrupt``, ``/free`` and ``/history``: submitting and managing prompts."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from comfyfleet.comfy import workflow
from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.emulators.comfyui.options import MODEL_EXTENSIONS
from comfyfleet.emulators.comfyui.routes.common import Route, canonical_uuid, json_body, server_error
from comfyfleet.emulators.comfyui.state import QueueItem

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer

logger = logging.getLogger(__name__)

SENSITIVE_EXTRA_DATA_KEYS = ("api_key_comfy_org", "auth_token_comfy_org")
_NO_PROMPT = {
    "type": "no_prompt",
    "message": "No prompt provided",
    "details": "No prompt provided",
    "extra_info": {},
}
_INVALID_PROMPT_ID = {
    "type": "invalid_prompt_id",
    "message": "prompt_id must be a valid UUID",
    "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
    "extra_info": {},
}


class _BadRequest(Exception):
    """Where upstream's handler raises: aiohttp answers a bare 500."""


class PromptRoutes:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    def routes(self) -> list[Route]:
        return [
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_one),
            ("POST", "/history", self.post_history),
        ]

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await self._prompt_body(request)
            number = self._number(body)
            if "prompt" not in body:
                return self._rejected({"error": _NO_PROMPT, "node_errors": {}})
            prompt_id = body.get("prompt_id")
            if prompt_id is None:
                prompt_id = str(uuid.uuid4())
            elif not canonical_uuid(prompt_id):
                return self._rejected({"error": _INVALID_PROMPT_ID, "node_errors": {}})
            result = self._validate(body)
            extra_data = self._extra_data(body, request)
        except _BadRequest:
            return server_error()
        if not result.ok:
            return self._rejected(result.response())
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        state = self.server.state
        state.put(QueueItem(number, prompt_id, body["prompt"], extra_data, result.good_outputs, sensitive))
        state.send_status()  # queued: it leaves after this answer, as upstream's send_sync does
        self.server.stats.prompts_accepted += 1
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        )

    async def _prompt_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await json_body(request)
        except ValueError:
            raise _BadRequest from None
        if isinstance(body, list | str):
            return {}
        if not isinstance(body, dict):
            raise _BadRequest
        return body

    def _number(self, body: Mapping[str, Any]) -> float:
        """``number`` from the body, else the per-process counter (used up even by a rejected prompt)."""
        state = self.server.state
        try:
            if "number" in body:
                return float(body["number"])
        except (TypeError, ValueError):
            raise _BadRequest from None
        number: float = state.number
        if body.get("front"):
            number = -number
        state.number += 1
        return number

    def _validate(self, body: Mapping[str, Any]) -> workflow.ValidationResult:
        try:
            return workflow.validate(
                body["prompt"],
                self.server.catalogue.validation_info(),
                partial_execution_targets=body.get("partial_execution_targets"),
                custom_validators={"LoadImage": {"image": self._validate_load_image}},
                accept_combo=self._accept_combo,
            )
        except (MalformedPrompt, TypeError, AttributeError):
            raise _BadRequest from None

    def _extra_data(self, body: Mapping[str, Any], request: web.Request) -> dict[str, Any]:
        extra_data = body.get("extra_data", {})
        if not isinstance(extra_data, dict):
            raise _BadRequest
        extra_data = dict(extra_data)
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if "Comfy-Usage-Source" in request.headers:
            extra_data["comfy_usage_source"] = request.headers["Comfy-Usage-Source"]
        return extra_data

    def _rejected(self, answer: dict[str, Any]) -> web.Response:
        self.server.stats.prompts_rejected += 1
        return web.json_response(answer, status=400)

    def _validate_load_image(self, name: str, inputs: Mapping[str, Any]) -> bool | str:
        image = inputs.get(name)
        if not isinstance(image, str) or self.server.annotated_path(image, "input") is None:
            return f"Invalid image file: {image}"
        return True

    def _accept_combo(self, class_type: str, input_name: str, value: Any) -> bool:
        return (
            self.server.options.accept_any_model
            and self.server.catalogue.is_model_input(class_type, input_name)
            and isinstance(value, str)
            and value.lower().endswith(MODEL_EXTENSIONS)
            and ".." not in value
        )

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.server.state.queue_remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        state = self.server.state
        running = [state.running.wire()] if state.running is not None else []
        return web.json_response(
            {"queue_running": running, "queue_pending": [i.wire() for i in state.pending()]}
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        state = self.server.state
        try:
            body = await json_body(request)
            if body.get("clear"):
                state.wipe_queue()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    state.delete_queued(prompt_id)
        except (ValueError, TypeError, KeyError):
            return server_error()
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        state = self.server.state
        try:
            body = await json_body(request)
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if not prompt_id:
            state.interrupt()  # the global form: whatever runs
        elif state.running is not None and state.running.prompt_id == prompt_id:
            state.interrupt()
        else:
            logger.info("emulator_interrupt_skipped prompt_id=%s reason=not_running", prompt_id)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        state = self.server.state
        try:
            body = await json_body(request)
            flags = {
                "unload_models": bool(body.get("unload_models", False)),
                "free_memory": bool(body.get("free_memory", False)),
            }
        except (ValueError, AttributeError):
            return server_error()
        if state.running is None:
            state.free(**flags)
        else:  # the executor handles the flags after the current prompt
            state.pending_free = {
                key: state.pending_free.get(key, False) or value for key, value in flags.items()
            }
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        history = self.server.state.history
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
            offset = int(request.query.get("offset", -1))
        except ValueError:
            return server_error()
        if offset < 0 and max_items is not None:
            offset = len(history) - max_items
        out: dict[str, Any] = {}
        for index, key in enumerate(history):
            if index >= offset:
                out[key] = history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return web.json_response(out)

    async def get_history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.server.state.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        history = self.server.state.history
        try:
            body = await json_body(request)
            if body.get("clear"):
                history.clear()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    history.pop(prompt_id, None)
        except (ValueError, TypeError, KeyError):
            return server_error()
        return web.Response(status=200)
