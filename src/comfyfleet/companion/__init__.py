"""The companion: a small program run in a worker image beside ComfyUI, for workers that share no disk with
the control plane (Novita instances, containers without the host cache mounted).

Before ComfyUI starts it pulls the worker's model files from the control plane's model store
(``GET /api/v1/models/blobs/{sha256}``, authenticated, resumed with ``Range``, each file verified against its
sha256 and renamed into place only then) into a local folder laid out like ComfyUI's ``models/``, writes the
``extra_model_paths.yaml`` that points ComfyUI at it, and then becomes ComfyUI (``exec``). So a worker whose
ComfyUI answers has every file of its manifest, and the fleet's usual readiness probe needs no change.
See docs/models.md ("Workers without a shared disk").
"""

from comfyfleet.companion.sync import CompanionError, blob_url, sync_models

__all__ = ["CompanionError", "blob_url", "sync_models"]
