"""The executor: one prompt at a time from the heap, with the frames upstream's ``PromptExecutor`` sends.

Per prompt (reference A.7, "Live sequence"): ``status`` (the queue's get), ``execution_start``,
``execution_cached``; per executed node ``progress_state`` / ``executing`` / [``progress``…] / [``executed``] /
``progress_state``; a cached output node only replays its ``executed``; then ``execution_success`` (or
``execution_error`` / ``execution_interrupted``), the history write, ``status``, ``executing{node: null}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comfyfleet.comfy import workflow
from comfyfleet.domain.graph import looks_like_link
from comfyfleet.emulators.comfyui.nodes import NODES_BY_NAME, Model, NodeFailed
from comfyfleet.emulators.comfyui.run import Crash, Interrupted, PromptRun, as_node_failure
from comfyfleet.emulators.comfyui.state import ComfyState, QueueItem

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.server import EmulatorServer

logger = logging.getLogger(__name__)

_CACHE_ENTRIES = 64
_OOM_TYPE = "torch.OutOfMemoryError"
_OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 21.47 GiB\n"
    "Requested               : 2.25 GiB\n"
    "Device limit            : 23.64 GiB\n"
    "Free (according to CUDA): 19.81 MiB\n"
    "PyTorch limit (set by user-supplied memory fraction)\n"
    "                        : 17179869184.00 GiB"
)
# Upstream appends this to an out-of-memory error's message (and a bare newline to any other).
_OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)
_TRACEBACK = (
    '  File "execution.py", line 496, in execute\n'
    "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n"
)


@dataclass(slots=True)
class Plan:
    """What will happen to one prompt: the nodes in execution order, which are cached, which fail or hang."""

    order: list[str]
    signatures: dict[str, str]
    cached: list[str]
    fail_node: str | None
    failure: NodeFailed | None
    hang_node: str | None

    @property
    def first_to_run(self) -> str | None:
        return next((node_id for node_id in self.order if node_id not in self.cached), None)


class Executor:
    """Upstream's ``prompt_worker`` thread, as a task in the server's loop."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.options = server.options
        self.stats = server.stats
        self._rng = random.Random(self.options.seed)
        self._rng_seed = self.options.seed

    async def run_forever(self, state: ComfyState) -> None:
        while True:
            while not state.heap:
                state.work.clear()
                await state.work.wait()
            # Upstream's executor is another thread: the POST /prompt answer does not wait for the run.
            # Yielding a few times lets the handler that queued this prompt flush its response first.
            for _ in range(3):
                await asyncio.sleep(0)
            if not state.heap:
                continue
            item = state.pop()
            state.send_status()  # upstream's queue get() announces the change
            try:
                await self.execute(state, item)
            except Crash:
                await self.server.crash()
                return
            except Exception:
                # A bug of the emulator, not a node error: say so loudly; the prompt is lost like in a crash.
                logger.exception("emulator_executor_error prompt_id=%s", item.prompt_id)
            finally:
                state.running = None
                state.client_id = None
                state.last_node_id = None
            if state.pending_free:
                state.free(**{k: state.pending_free.get(k, False) for k in ("unload_models", "free_memory")})
                state.pending_free = {}

    async def execute(self, state: ComfyState, item: QueueItem) -> None:
        state.client_id = item.extra_data.get("client_id")
        state.interrupted = False
        state.interrupt_event.clear()
        self.stats.prompts_started += 1
        self.stats.started_since_restart += 1
        self.stats.executions[item.prompt_id] = self.stats.executions.get(item.prompt_id, 0) + 1
        run = PromptRun(self.server, state, item)
        run.add_message("execution_start", {"prompt_id": item.prompt_id}, broadcast=False)
        if (
            self.options.crash_after is not None
            and self.stats.started_since_restart > self.options.crash_after
        ):
            raise Crash
        plan = self._plan(state, item.prompt, item.outputs)
        run.add_message(
            "execution_cached", {"nodes": plan.cached, "prompt_id": item.prompt_id}, broadcast=False
        )
        status_str = await self._run_nodes(run, plan)
        await self._finish(run, status_str)

    # -- planning --
    def _plan(self, state: ComfyState, prompt: Mapping[str, Any], outputs: list[str]) -> Plan:
        order = _execution_order(prompt, outputs)
        signatures = self._signatures(prompt, order) if self.options.cache else {}
        reachable = set(order)
        # Upstream lists cached nodes in the prompt's own order, not in execution order.
        cached = [
            node_id for node_id in prompt if node_id in reachable and signatures.get(node_id) in state.cache
        ]
        fail_node, failure, hang_node = self._plan_fault([n for n in order if n not in cached], prompt)
        return Plan(order, signatures, cached, fail_node, failure, hang_node)

    def _signatures(self, prompt: Mapping[str, Any], order: list[str]) -> dict[str, str]:
        signatures: dict[str, str] = {}
        for node_id in order:
            node = prompt[node_id]
            parts: dict[str, Any] = {}
            for name, value in node["inputs"].items():
                parts[name] = ["link", signatures[value[0]], value[1]] if looks_like_link(value) else value
            if node["class_type"] == "LoadImage":
                path = self.server.annotated_path(str(node["inputs"].get("image", "")), "input")
                stat = os.stat(path) if path else None
                parts["__file__"] = [stat.st_size, stat.st_mtime_ns] if stat else None
            encoded = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
            signatures[node_id] = hashlib.sha256(encoded.encode()).hexdigest()
        return signatures

    def _plan_fault(
        self, order: list[str], prompt: Mapping[str, Any]
    ) -> tuple[str | None, NodeFailed | None, str | None]:
        """Which node (if any) fails, with what, and which node hangs."""
        options = self.options
        if options.seed != self._rng_seed:
            self._rng = random.Random(options.seed)
            self._rng_seed = options.seed
        failing: NodeFailed | None = None
        roll = self._rng.random()
        if roll < options.oom_rate:
            failing = NodeFailed(_OOM_TYPE, _OOM_MESSAGE)
        elif roll < options.oom_rate + options.failure_rate:
            failing = NodeFailed("RuntimeError", "Emulated node failure (failure_rate)")
        fail_node = None
        if failing is not None and order:
            samplers = [n for n in order if prompt[n]["class_type"] == "KSampler"]
            fail_node = samplers[0] if samplers else order[-1]
        hang_node = None
        if options.hang_s > 0 and self._rng.random() < options.hang_rate:
            candidates = [n for n in order if options.hang_node in (None, prompt[n]["class_type"])]
            hang_node = candidates[0] if candidates else None
        return fail_node, failing, hang_node

    # -- running --
    async def _run_nodes(self, run: PromptRun, plan: Plan) -> str:
        """Run the plan; report how it ended. Returns the history's ``status_str``."""
        try:
            for node_id in plan.order:
                if node_id in plan.cached:
                    self._replay(run, plan, node_id)
                else:
                    await self._run_node(run, plan, node_id)
            if plan.first_to_run is None and self.options.prompt_time_s:
                run.node_id = plan.order[-1] if plan.order else ""
                await run.interruptible_sleep(self.options.prompt_time_s)
            run.add_message("execution_success", {"prompt_id": run.prompt_id}, broadcast=False)
            self.stats.prompts_succeeded += 1
            return "success"
        except Interrupted as interrupted:
            self.stats.prompts_interrupted += 1
            node_id = interrupted.node_id or run.node_id
            run.add_message(
                "execution_interrupted",
                {"prompt_id": run.prompt_id, "node_id": node_id,
                 "node_type": run.prompt[node_id]["class_type"] if node_id in run.prompt else None,
                 "executed": list(run.executed)},
                broadcast=True,
            )  # fmt: skip
        except NodeFailed as failed:
            self.stats.prompts_failed += 1
            self._report_failure(run, failed)
        return "error"

    def _replay(self, run: PromptRun, plan: Plan, node_id: str) -> None:
        """A cached node: its outputs come from the cache; an output node replays its ``executed``."""
        cache = run.state.cache
        run.values[node_id], ui = cache[plan.signatures[node_id]]
        cache.move_to_end(plan.signatures[node_id])
        self.stats.cached_nodes += 1
        if ui is not None:
            run.ui_outputs[node_id] = ui
            run.send(
                "executed",
                {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": run.prompt_id},
            )

    async def _run_node(self, run: PromptRun, plan: Plan, node_id: str) -> None:
        class_type = run.prompt[node_id]["class_type"]
        run.start_node(node_id)
        if node_id == plan.first_to_run and self.options.prompt_time_s:
            await run.interruptible_sleep(self.options.prompt_time_s)
        run.check_interrupt()  # upstream's before_node_execution: after the node's executing frame
        self.stats.node_executions[class_type] = self.stats.node_executions.get(class_type, 0) + 1
        if node_id == plan.hang_node:
            await self._hang()
        inputs = {
            name: run.values[value[0]][value[1]] if looks_like_link(value) else value
            for name, value in run.prompt[node_id]["inputs"].items()
        }
        run.current_inputs = _formatted_inputs(run, node_id, inputs)
        if node_id == plan.fail_node and plan.failure is not None:
            raise plan.failure
        if class_type == "KSampler" and isinstance(inputs.get("model"), Model):
            model = inputs["model"]  # back into VRAM after an eviction: from RAM, no file read
            await run.load_model(_model_folder(run.prompt, model), model.name, from_disk=False)
        try:
            outputs, ui = await NODES_BY_NAME[class_type].run(run, inputs)
        except (NodeFailed, Interrupted, Crash, asyncio.CancelledError):
            raise
        except Exception as exc:  # any error inside a node is that prompt's execution_error
            raise as_node_failure(exc) from exc
        run.values[node_id] = outputs
        run.executed.append(node_id)
        self._remember(run.state, plan.signatures.get(node_id), outputs, ui)
        if ui is not None:
            run.ui_outputs[node_id] = ui
            run.send(
                "executed",
                {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": run.prompt_id},
                to_client_only=True,
            )
        finished = run.node_states[node_id]["max"]
        run.progress_state(node_id, "finished", finished, finished)

    async def _hang(self) -> None:
        # Deaf to interrupts, like a node without a progress bar.
        if math.isinf(self.options.hang_s):
            await asyncio.Event().wait()
        await asyncio.sleep(self.options.hang_s)

    def _remember(
        self, state: ComfyState, signature: str | None, outputs: tuple[Any, ...], ui: dict[str, Any] | None
    ) -> None:
        if not self.options.cache or signature is None:
            return
        state.cache[signature] = (outputs, ui)
        while len(state.cache) > _CACHE_ENTRIES:
            state.cache.popitem(last=False)

    def _report_failure(self, run: PromptRun, failed: NodeFailed) -> None:
        node_id = run.node_id
        class_type = run.prompt[node_id]["class_type"]
        tips = ""
        if failed.exception_type == _OOM_TYPE:
            tips = _OOM_TIPS
            run.state.loaded_models.clear()  # "Got an OOM, unloading all loaded models."
        run.add_message(
            "execution_error",
            {
                "prompt_id": run.prompt_id,
                "node_id": node_id,
                "node_type": class_type,
                "executed": list(run.executed),
                "exception_message": f"{failed.message}\n{tips}",
                "exception_type": failed.exception_type,
                "traceback": [
                    _TRACEBACK,
                    f'  File "nodes.py", line 1, in {class_type}\n    raise {failed.exception_type}\n',
                ],
                "current_inputs": run.current_inputs,
                # Upstream sends every node id of the prompt here (the cache's key set), not outputs.
                "current_outputs": list(run.prompt),
            },
            broadcast=False,
        )

    async def _finish(self, run: PromptRun, status_str: str) -> None:
        state = run.state
        state.last_node_id = None
        if self.options.history_delay_s:
            await asyncio.sleep(self.options.history_delay_s)
        state.remember(
            run.prompt_id,
            {
                "prompt": run.item.wire(),
                "outputs": run.ui_outputs,
                "status": {
                    "status_str": status_str,
                    "completed": status_str == "success",
                    "messages": run.messages,
                },
                "meta": {
                    node_id: {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    }
                    for node_id in run.ui_outputs
                },
            },
        )
        state.running = None
        state.send_status()  # upstream's task_done: history is written, the queue changed
        run.send("executing", {"node": None, "prompt_id": run.prompt_id}, to_client_only=True)


def _execution_order(prompt: Mapping[str, Any], outputs: list[str]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if looks_like_link(value):
                visit(value[0])
        order.append(node_id)

    for output in outputs:
        visit(output)
    return order


def _formatted_inputs(run: PromptRun, node_id: str, inputs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Upstream's ``current_inputs``: each declared or linked input, and the hidden ones, as a list of one
    value: JSON scalars as they are, anything else as its ``str``."""
    node = run.prompt[node_id]
    spec = NODES_BY_NAME[node["class_type"]]
    formatted = {
        name: [_format_value(value)]
        for name, value in inputs.items()
        if looks_like_link(node["inputs"][name]) or name in spec.required or name in spec.optional
    }
    for name, kind in spec.hidden.items():
        if kind == "PROMPT":
            formatted[name] = [_format_value(dict(run.prompt))]
        elif kind == "EXTRA_PNGINFO":
            formatted[name] = [_format_value(run.extra_data.get("extra_pnginfo"))]
        elif kind == "UNIQUE_ID":
            formatted[name] = [node_id]
    return formatted


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


def _model_folder(prompt: Mapping[str, Any], model: Model) -> str:
    for reference in workflow.model_references(prompt):
        if reference.name == model.name:
            return reference.folder
    return "checkpoints"
