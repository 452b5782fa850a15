#!/bin/sh
# The worker image's entrypoint (under tini): starts ComfyUI with the model folder comfyfleet gives it.
#
# * Companion mode (COMFYFLEET_COMPANION_URL set; a worker that shares no disk with the control plane, e.g. a
#   Novita instance or a container without the host cache mounted): `comfyfleet companion` first pulls the
#   pool's model files from the control plane (COMFYFLEET_COMPANION_TOKEN, COMFYFLEET_COMPANION_MANIFEST),
#   verified, into COMFYFLEET_COMPANION_DIR, then becomes ComfyUI with --extra-model-paths-config pointing there.
#   ComfyUI answers only once every file is in place, so the fleet's readiness probe covers the download.
# * Mounted mode (COMFYFLEET_EXTRA_MODEL_PATHS set by the docker provider): the worker's folder is mounted,
#   ComfyUI reads it through that extra_model_paths.yaml.
# * Neither: ComfyUI as given (models baked in or mounted by hand).
set -eu
if [ -n "${COMFYFLEET_COMPANION_URL:-}" ]; then
  exec /opt/comfyfleet/bin/comfyfleet companion -- "$@" --extra-model-paths-config "{extra_model_paths}"
fi
if [ -n "${COMFYFLEET_EXTRA_MODEL_PATHS:-}" ]; then
  exec "$@" --extra-model-paths-config "$COMFYFLEET_EXTRA_MODEL_PATHS"
fi
exec "$@"
