"""Assets: files a tenant uploaded (Comfy API v2) or a job produced, and the model files of the fleet.

An uploaded asset is a record over a **blob**: bytes the tenant uploaded once, named by their blake3 hash and
shared by every record over the same bytes of that tenant (deduplication). A job's output is an asset over
the file comfyfleet collected for the task. A model file (``models/<folder>/<name>.safetensors``) is also kept
as a fleet-wide record, content-addressed by sha256, for the workers that will need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class StoredFile:
    """Where the output store keeps a file's bytes: its folder and its key (name) in that folder."""

    folder: str
    key: str


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes one tenant uploaded, with their hashes (``blake3:<hex>``, sha256 hex) and where they are kept."""

    tenant: str
    hash: str
    sha256: str
    size: int
    file: StoredFile


@dataclass(frozen=True, slots=True)
class Asset:
    """A tenant's record of a file: an upload (over a blob, ``hash`` set) or a job's output (``job_id`` set,
    ``hash`` not computed). ``file_path`` is the name the client gave (``photo.png``,
    ``models/loras/x.safetensors``)."""

    id: str
    tenant: str
    hash: str | None
    size: int
    content_type: str
    file_path: str | None
    file: StoredFile
    created_at: datetime
    job_id: str | None = None
    tags: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A model file of the fleet: ``folder`` (ComfyUI's, e.g. ``loras``) and ``name`` within it (may hold
    sub-folders), content-addressed by ``sha256`` (and ``blake3``), its bytes in the output store."""

    sha256: str
    blake3: str
    folder: str
    name: str
    size: int
    file: StoredFile
    tenant: str  # who uploaded it first
    created_at: datetime
