"""Assets (Comfy API v2): files a tenant uploaded or a job produced, kept in the output store, recorded in the
store, resolved from ``core/ASSET`` references at submission; and the fleet's model files.

``AssetService`` is what the v2 front door uses; ``ModelLibrary`` (``find_model(sha256)``,
``list_models(folder)``, ``read(model)``) and ``place_model_file`` are for the parts that put model files on
workers. Nothing here imports the web framework.
"""

from comfyfleet.assets.errors import (
    AssetError,
    AssetInUse,
    AssetNotFound,
    AssetsUnavailable,
    BlobNotFound,
    HashMismatch,
    InvalidAsset,
    MissingAsset,
    ModelNameTaken,
)
from comfyfleet.assets.models import ModelLibrary, place_model_file
from comfyfleet.assets.service import AssetService, OutputAsset, Resolved, output_asset_id

__all__ = [
    "AssetError",
    "AssetInUse",
    "AssetNotFound",
    "AssetService",
    "AssetsUnavailable",
    "BlobNotFound",
    "HashMismatch",
    "InvalidAsset",
    "MissingAsset",
    "ModelLibrary",
    "ModelNameTaken",
    "OutputAsset",
    "Resolved",
    "output_asset_id",
    "place_model_file",
]
