"""Models on demand: model files a pool or a task needs, fetched once per host into a verified,
content-addressed cache and linked into each worker's models folder (docs/models.md).

This package sits below dispatch and the fleet and above the store. Its parts: :mod:`.spec` (what a model
file is, the pool's rules), :mod:`.sources` (http(s), s3, uploaded model assets), :mod:`.cache` (the host
cache: verify, coalesce, budget and eviction), :mod:`.links` (worker folders) and :mod:`.service` (the facade
the fleet, the dispatcher and the API use).
"""

from comfyfleet.models.spec import (
    DEFAULT_MODEL_FOLDERS,
    ModelFetchError,
    ModelFetchExhausted,
    ModelPolicy,
    ModelRejected,
    ModelsError,
    ModelSpec,
    ModelUnavailable,
    parse_specs,
)

__all__ = [
    "DEFAULT_MODEL_FOLDERS",
    "ModelFetchError",
    "ModelFetchExhausted",
    "ModelPolicy",
    "ModelRejected",
    "ModelSpec",
    "ModelUnavailable",
    "ModelsError",
    "parse_specs",
]
