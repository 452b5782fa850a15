"""Why the asset service refused: one root, one subclass per decision the caller makes. Each has a stable
``code`` (Comfy API v2's where it has one) and a ``message`` for people."""

from __future__ import annotations

from collections.abc import Sequence


class AssetError(Exception):
    code = "asset_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AssetNotFound(AssetError):
    """No such asset, or not one the caller may see."""

    code = "not_found"


class BlobNotFound(AssetError):
    """No bytes of that hash the caller may mint an asset from (unknown and "not yours" look the same)."""

    code = "blob_not_found"


class HashMismatch(AssetError):
    """The hash the client declared is not the hash of the bytes received; nothing was stored."""

    code = "hash_mismatch"


class InvalidAsset(AssetError):
    """The upload cannot be an asset as sent: its path, or a model file that is not safetensors."""

    code = "invalid_asset"


class ModelNameTaken(AssetError):
    """A model file of that folder and name exists with other content; model files are never overwritten."""

    code = "model_name_taken"


class AssetInUse(AssetError):
    """The record cannot be deleted while something depends on it (a job's outputs)."""

    code = "asset_in_use"


class MissingAsset(AssetError):
    """A ``core/ASSET`` reference of a workflow is malformed, unknown, or not the caller's."""

    code = "missing_asset"

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class AssetsUnavailable(AssetError):
    """The output store that keeps the bytes is missing or failed; try again later."""

    code = "upstream_error"
