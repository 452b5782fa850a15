"""A submission's ``models``: the model files the task brings, checked at the door.

What can never be fetched is refused here, with the position of the file at fault, instead of failing the task
later: a spec that is not ``{url, sha256, folder, name}``, a pickle format or a non-public host that the pools
the task may run in do not all allow (a task without a pool may run in any of them), two files under one name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from comfyfleet.models import ModelPolicy, ModelRejected, parse_specs
from comfyfleet.tasks.errors import Problem, Rejected

if TYPE_CHECKING:
    from comfyfleet.config import Settings
    from comfyfleet.models.service import ModelService

CODE = "invalid_models"


def task_policy(settings: Settings, pool: str | None) -> ModelPolicy:
    """What every pool a task with this ``pool`` field may run in allows (a name or a label)."""
    candidates = [
        candidate.model_policy
        for candidate in settings.pools
        if pool is None or pool == candidate.name or pool in candidate.labels
    ]
    return ModelPolicy.strictest(candidates)


async def check_models(
    raw: list[dict[str, Any]] | None, policy: ModelPolicy, service: ModelService | None
) -> list[dict[str, Any]] | None:
    """The task's models as they are stored (each spec complete, its name filled in); :class:`Rejected` with
    code ``invalid_models`` otherwise."""
    if not raw:
        return None
    try:
        specs = parse_specs(raw)
        if service is None:
            for index, spec in enumerate(specs):
                policy.check_format(spec, index)
        else:
            await service.check_request(specs, policy)
    except ModelRejected as exc:
        message = str(exc)
        raise Rejected(CODE, message, [Problem(("models", exc.index or 0), message, CODE)]) from None
    return [spec.model_dump() for spec in specs]
