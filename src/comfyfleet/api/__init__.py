"""The REST API (``/api/v1``): routes, wire schemas, and how the task service's refusals are worded.

``install_api(app)`` mounts it on the application the composition root (``comfyfleet.runtime``) builds.
"""

from comfyfleet.api.app import API_V1_PREFIX, DESCRIPTION, OPENAPI_TAGS, install_api

__all__ = ["API_V1_PREFIX", "DESCRIPTION", "OPENAPI_TAGS", "install_api"]
