# shellcheck shell=bash
# A real Docker engine for the docker provider's tests, sourced by scripts/test (set -euo pipefail is on).
#
# Installs Debian's docker.io and debootstrap when missing, starts a private dockerd whose state, exec root and
# socket live under .test-run/docker, exports DOCKER_HOST, and builds the test worker image (a debootstrap
# minbase imported into the engine, then python3 and comfyfleet from a wheelhouse built on the host; no
# registry is needed). Every step is skipped when its result already exists. dockerd is stopped when
# scripts/test exits. Without root and without a usable engine the docker tests skip (they fail under CI=true).

docker_dir="${run_dir:?}/docker"
mkdir -p "$docker_dir"

_cf_log() { echo "[docker.sh] $*" >&2; }

_cf_docker_tools_present() {
  command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 && command -v docker >/dev/null 2>&1
}

if ! _cf_docker_tools_present && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  _cf_log "installing docker.io and debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$docker_dir/apt.log" 2>&1
  apt-get install -y -qq --no-install-recommends docker.io debootstrap >>"$docker_dir/apt.log" 2>&1
fi

_cf_dockerd_pid=""
_cf_stop_dockerd() {
  if [ -n "$_cf_dockerd_pid" ] && kill -0 "$_cf_dockerd_pid" 2>/dev/null; then
    kill "$_cf_dockerd_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$_cf_dockerd_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$_cf_dockerd_pid" 2>/dev/null || true
  fi
}

_cf_start_dockerd() {
  local sock="$docker_dir/docker.sock" pidfile="$docker_dir/dockerd.pid"
  export DOCKER_HOST="unix://$sock"
  # A daemon left by an interrupted run is ours too: reuse it and stop it at the end.
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    _cf_dockerd_pid=$(cat "$pidfile")
  else
    rm -f "$sock" "$pidfile"
    dockerd --data-root "$docker_dir/data" --exec-root "$docker_dir/exec" --pidfile "$pidfile" \
      -H "$DOCKER_HOST" --containerd-namespace comfyfleet-test \
      --containerd-plugins-namespace comfyfleet-test-plugins >"$docker_dir/dockerd.log" 2>&1 &
    _cf_dockerd_pid=$!
  fi
  local deadline=$((SECONDS + 60))
  until docker version >/dev/null 2>&1; do
    if ! kill -0 "$_cf_dockerd_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      _cf_log "dockerd did not come up; see $docker_dir/dockerd.log"
      tail -n 20 "$docker_dir/dockerd.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

_cf_build_test_image() {
  local base_image="comfyfleet-test/debian-minbase:bookworm"
  local lock_hash src_hash deps_image worker_image context="$docker_dir/context"
  lock_hash=$(cat requirements.lock pyproject.toml deploy/test-worker/Dockerfile.deps | sha256sum | cut -c1-12)
  src_hash=$( (find src -name '*.py' -o -name '*.sql' -o -name '*.html' | LC_ALL=C sort | xargs cat; cat deploy/test-worker/Dockerfile) | sha256sum | cut -c1-12)
  deps_image="comfyfleet-test/deps:$lock_hash"
  worker_image="comfyfleet-test/worker:$src_hash"
  export COMFYFLEET_TEST_DOCKER_IMAGE="$worker_image"
  if docker image inspect "$worker_image" >/dev/null 2>&1; then
    return 0
  fi
  if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    _cf_log "building the debootstrap minbase image"
    rm -rf "$docker_dir/rootfs"
    debootstrap --variant=minbase bookworm "$docker_dir/rootfs" http://deb.debian.org/debian \
      >"$docker_dir/debootstrap.log" 2>&1
    tar -C "$docker_dir/rootfs" -c . | docker import - "$base_image" >/dev/null
    rm -rf "$docker_dir/rootfs"
  fi
  rm -rf "$context"
  mkdir -p "$context/wheels"
  if ! docker image inspect "$deps_image" >/dev/null 2>&1; then
    _cf_log "building the dependency layer ($deps_image)"
    # Only the runtime dependencies, pinned by the lock file, as wheels for the image's Python 3.11.
    uv pip compile --quiet pyproject.toml -c requirements.lock -o "$context/requirements.txt"
    if [ ! -f "$docker_dir/wheels-$lock_hash/.done" ]; then
      rm -rf "$docker_dir"/wheels-*
      mkdir -p "$docker_dir/wheels-$lock_hash"
      python3 -m pip wheel --quiet --disable-pip-version-check -r "$context/requirements.txt" \
        -w "$docker_dir/wheels-$lock_hash" >"$docker_dir/pip-wheel.log" 2>&1
      touch "$docker_dir/wheels-$lock_hash/.done"
    fi
    cp "$docker_dir/wheels-$lock_hash"/*.whl "$context/wheels/"
    cp deploy/test-worker/Dockerfile.deps "$context/Dockerfile"
    DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$base_image" -t "$deps_image" "$context" \
      >"$docker_dir/build-deps.log" 2>&1 || { tail -n 30 "$docker_dir/build-deps.log" >&2; return 1; }
    rm -rf "$context"
    mkdir -p "$context/wheels"
  fi
  _cf_log "building the test worker image ($worker_image)"
  uv build --quiet --wheel --out-dir "$context/wheels" . >"$docker_dir/uv-build.log" 2>&1
  cp deploy/test-worker/Dockerfile "$context/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --quiet --build-arg "DEPS=$deps_image" -t "$worker_image" "$context" \
    >"$docker_dir/build-worker.log" 2>&1 || { tail -n 30 "$docker_dir/build-worker.log" >&2; return 1; }
  rm -rf "$context"
  # Older builds of the two layers are of no further use.
  docker images --format '{{.Repository}}:{{.Tag}}' comfyfleet-test/worker | grep -vxF "$worker_image" \
    | xargs -r docker rmi >/dev/null 2>&1 || true
  docker images --format '{{.Repository}}:{{.Tag}}' comfyfleet-test/deps | grep -vxF "$deps_image" \
    | xargs -r docker rmi >/dev/null 2>&1 || true
}

if command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  _cf_prev_exit_trap=$(trap -p EXIT | sed -e "s/^trap -- '//" -e "s/' EXIT\$//")
  # shellcheck disable=SC2064
  trap "_cf_stop_dockerd; ${_cf_prev_exit_trap:-:}" EXIT
  if _cf_start_dockerd; then
    _cf_build_test_image || _cf_log "could not build the test image; docker tests will not run"
  else
    unset DOCKER_HOST
  fi
else
  _cf_log "no dockerd (or not root): docker tests will skip"
fi
