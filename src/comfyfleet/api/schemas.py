"""Wire models of the REST API: what clients send and receive (also the OpenAPI schema).

Responses are built as plain dicts (``comfyfleet.http.wire``) and serialized once by pydantic-core, which
is several times cheaper than validating a response model per request; the models below still describe
them exactly for ``/openapi.json`` and ``/docs``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from comfyfleet.domain.graph import MAX_VALUE_DEPTH, exceeds_depth, looks_like_api_graph

# The error shape, which every route of the API documents for its failures.
from comfyfleet.http.errors import ErrorOut as ErrorOut
from comfyfleet.http.errors import InvalidInput
from comfyfleet.http.errors import error_responses as error_responses
from comfyfleet.tasks.checks import check_api_format

MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_RETRIES = 100

TaskStatusName = Literal["pending", "running", "completed", "failed", "cancelled"]
TaskPhaseName = Literal["dispatching", "fetching_models", "queued_on_worker", "executing"]


class TaskSubmission(BaseModel):
    """Body of ``POST /api/v1/tasks``. Unknown fields are refused so a misspelt option is not silently ignored."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "workflow_id": "text_to_image_v1",
                    "priority": 5,
                    "payload": {
                        "4": {
                            "class_type": "CheckpointLoaderSimple",
                            "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"},
                        },
                        "5": {
                            "class_type": "EmptyLatentImage",
                            "inputs": {"batch_size": 1, "height": 512, "width": 512},
                        },
                        "6": {
                            "class_type": "CLIPTextEncode",
                            "inputs": {"clip": ["4", 1], "text": "a glass bottle"},
                        },
                        "7": {
                            "class_type": "CLIPTextEncode",
                            "inputs": {"clip": ["4", 1], "text": "text, watermark"},
                        },
                        "3": {
                            "class_type": "KSampler",
                            "inputs": {
                                "cfg": 8,
                                "denoise": 1,
                                "latent_image": ["5", 0],
                                "model": ["4", 0],
                                "negative": ["7", 0],
                                "positive": ["6", 0],
                                "sampler_name": "euler",
                                "scheduler": "normal",
                                "seed": 46588125086418,
                                "steps": 20,
                            },
                        },
                        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
                        "9": {
                            "class_type": "SaveImage",
                            "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
                        },
                    },
                }
            ],
        },
    )

    payload: dict[str, Any] = Field(
        description="The workflow as a ComfyUI API-format graph: node id → {class_type, inputs}. Links are "
        "[node_id, output_index]; every link must name a node of the graph and the links must not form a cycle.",
    )
    workflow_id: str | None = Field(
        default=None,
        max_length=256,
        description="A label of your choosing (e.g. the workflow's name); filterable.",
    )
    priority: StrictInt = Field(
        default=0,
        description="Higher runs first; equal priorities run in submission order. An integer within the "
        "server's limits (by default -1,000,000 to 1,000,000).",
    )
    max_retries: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_RETRIES,
        description="How many times a failed attempt may be retried (worker lost, out of memory…). "
        "Default: the server's dispatch.default_max_retries.",
    )
    timeout_s: StrictFloat | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Seconds one attempt may run before it is interrupted. Default: dispatch.default_timeout_s.",
    )
    pool: str | None = Field(default=None, max_length=128, description="Run only on workers of this pool.")
    inputs: list[dict[str, Any]] | None = Field(
        default=None,
        description="Input files to place on the worker before the run (see the input-file docs).",
    )
    webhook: dict[str, Any] | None = Field(
        default=None,
        description='Where to POST the outcome: {"url": "https://…"} (a plain URL string also works).',
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Free-form data kept with the task and returned as is."
    )
    models: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=64,
        description="Model files the task brings, put on its worker before the prompt is sent (docs/models.md): "
        'each {"url": "https://…" | "s3://bucket/key" | "asset://<sha256>", "sha256": "<hex>", "folder": '
        '"loras", "name": "style.safetensors"} (name defaults to the URL\'s file name). Files are verified by '
        "sha256 and kept once per host. Refused with 422 (invalid_models) when a file can never be had: a bad "
        "sha256 or folder, a pickle format (.ckpt, .pt, .pth, .bin) or a non-public host the task's pool does "
        "not allow. A file that cannot be fetched fails the task with error_kind model_unavailable.",
        examples=[
            [
                {
                    "url": "https://example.com/loras/watercolor.safetensors",
                    "sha256": "9f2c1b0e5a7d43c68e1f0b2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7",
                    "folder": "loras",
                }
            ]
        ],
    )

    @model_validator(mode="before")
    @classmethod
    def _a_workflow_sent_as_the_whole_body(cls, data: Any) -> Any:
        # Newcomers post the exported file itself: say what to do instead of listing every node id as an
        # unknown field. (Raised as the task service's and the API's own errors, which pydantic lets through.)
        if isinstance(data, dict) and "payload" not in data:
            check_api_format(data, location=())
            if looks_like_api_graph(data):
                raise InvalidInput(
                    'the body is a workflow graph: wrap it as {"payload": <the graph>}, with the task\'s '
                    "other fields (priority, workflow_id…) beside it",
                    [{"loc": ["body"], "message": "a bare workflow graph", "type": "payload_not_wrapped"}],
                    error="payload_not_wrapped",
                )
        return data

    @field_validator("webhook", mode="before")
    @classmethod
    def _webhook_url_shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("metadata", "webhook", "inputs", "models")
    @classmethod
    def _not_absurdly_nested(cls, value: Any) -> Any:
        # Kept values are sent back in every answer: refuse what could be stored but not serialized again.
        if value is not None and exceeds_depth(value, MAX_VALUE_DEPTH):
            raise ValueError(f"nested deeper than {MAX_VALUE_DEPTH} levels")
        return value


class TaskUpdate(BaseModel):
    """Body of ``PATCH /api/v1/tasks/{id}``: what may change while a task waits."""

    model_config = ConfigDict(extra="forbid")

    priority: StrictInt = Field(
        description="The task's new priority, within the server's limits (as at submission)."
    )


class AttemptOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    attempt: int
    worker_id: str | None = None
    prompt_id: str | None = None
    error: str | None = None
    kind: str | None = None


class TaskOut(BaseModel):
    """A task: every field of the seed's Task plus the lifecycle's. Times are RFC 3339 UTC strings."""

    id: str
    workflow_id: str | None
    priority: int
    status: TaskStatusName
    payload: dict[str, Any]
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    result: dict[str, Any] | None
    error: str | None
    retry_count: int
    max_retries: int
    phase: TaskPhaseName | None = Field(
        description="Inside running: dispatching, fetching_models (the task's model files are being put on its "
        "worker), queued_on_worker or executing."
    )
    attempt: int = Field(description="Number of the current (or last) attempt; 0 before the first claim.")
    prompt_id: str | None
    timeout_s: float
    not_before: datetime | None = Field(description="A retry waits until then.")
    tenant: str
    updated_at: datetime
    pool: str | None
    progress: dict[str, Any] | None
    attempts: list[AttemptOut]
    error_kind: str | None
    error_details: dict[str, Any] | None
    cancel_requested: bool
    idempotency_key: str | None
    inputs: list[dict[str, Any]] | None
    webhook: dict[str, Any] | None
    metadata: dict[str, Any] | None
    models: list[dict[str, Any]] | None = Field(
        default=None, description="The model files the task brings, as stored (each with its name filled in)."
    )
    webhook_deliveries: list[dict[str, Any]] | None = Field(
        default=None,
        description="GET /api/v1/tasks/{id} of a task with a webhook: its delivery once the task ended (url, "
        "event, status pending|delivered|failed, attempts, last_status_code, last_error, history of attempts).",
    )
    queue_position: int | None = Field(
        description="1 = next to run. Given by GET /api/v1/tasks/{id} for a pending task; null otherwise "
        "(and in lists and submissions, where computing it would slow the queue down)."
    )
    estimated_start_s: float | None = Field(
        description="Given with queue_position: a rough estimate of the seconds until the task starts, from the "
        "ready workers that can take it and the mean execution time of recently completed tasks; null when there "
        "is no basis (no ready worker, no completed task yet). It moves as tasks of higher priority arrive and "
        "workers start or stop.",
    )


class TaskListItemOut(TaskOut):
    """A task in a list: as :class:`TaskOut`, its ``payload`` only when asked for."""

    payload: dict[str, Any] | None = Field(  # type: ignore[assignment]
        default=None,
        description="Only with ?include=payload: lists leave each task's workflow graph out unless asked.",
    )


class TaskListOut(BaseModel):
    tasks: list[TaskListItemOut] = Field(
        description="Newest first; at most `limit` of them, and at most `limits.max_page_bytes` of JSON (a page "
        "cut short by that budget has a next_cursor)."
    )
    count: int = Field(description="Number of tasks in this page.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class QueueMetricsOut(BaseModel):
    pending_tasks: int
    running_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    oldest_pending_age_s: float | None


class WorkflowCheck(BaseModel):
    """Body of ``POST /api/v1/workflows/validate``."""

    model_config = ConfigDict(extra="forbid")

    payload: dict[str, Any] = Field(
        description="The workflow as a ComfyUI API-format graph, as in a task submission."
    )


class ModelReferenceOut(BaseModel):
    node_id: str
    input_name: str
    folder: str = Field(description="The ComfyUI model folder the input reads from (checkpoints, loras…).")
    name: str


class WorkflowValidationOut(BaseModel):
    valid: bool = Field(
        description="True when nothing is wrong: the structure, and (when checked) every node type, "
        "input and model against the workers' catalogue."
    )
    checked_against: Literal["workers", "structure"] = Field(
        description="'workers': the node catalogue of the fleet's workers (those up now, else the last seen), with "
        "the model files found on any of them; 'structure': no worker was seen yet, only the graph's shape was checked."
    )
    errors: list[dict[str, Any]] = Field(
        description="Structural problems ({node_id, input_name, type, message}); when any, nothing else was checked."
    )
    error: dict[str, Any] | None = Field(
        description="ComfyUI's top-level error, as its POST /prompt would answer."
    )
    node_errors: dict[str, Any] = Field(
        description="ComfyUI's node_errors: node id → {errors, class_type, dependent_outputs}."
    )
    node_types: list[str] = Field(description="The node types the graph uses.")
    missing_node_types: list[str] = Field(
        description="Node types no worker offers (custom nodes not installed)."
    )
    models: list[ModelReferenceOut] = Field(description="The model files the graph's loaders name.")


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready"]
