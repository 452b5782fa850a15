"""The pure rules: what a model spec may be, what a pool allows, and how placement ranks workers for a task
that brings files (loaded > on the host's disk > must fetch; never a worker whose folder comfyfleet does not
manage)."""

from __future__ import annotations

import pytest

from comfyfleet.config import ConfigError, load_settings
from comfyfleet.dispatch.placement import PendingTask, Slot, accepts, model_affinity, plan
from comfyfleet.models import ModelPolicy, ModelRejected, ModelSpec, parse_specs

SHA = "ab" * 32


def test_a_spec_names_a_plain_file_in_a_comfyui_folder() -> None:
    spec = ModelSpec(
        url="https://example.com/m/sd%20xl.safetensors?download=1", sha256=SHA.upper(), folder="checkpoints"
    )
    assert (spec.name, spec.sha256, spec.path) == ("sd xl.safetensors", SHA, "checkpoints/sd xl.safetensors")
    for bad, problem in [
        ({"folder": "custom_nodes"}, "not a ComfyUI model folder"),
        ({"sha256": "xyz"}, "64 hexadecimal digits"),
        ({"name": "../x.safetensors"}, "plain file name"),
        ({"name": "x.exe"}, "must end in one of"),
        ({"url": "file:///etc/passwd"}, "url must be"),
        ({"url": f"asset://{'cd' * 32}", "name": "x.safetensors"}, "same sha256"),
    ]:
        raw = {"url": "https://example.com/x.safetensors", "sha256": SHA, "folder": "loras", **bad}
        with pytest.raises(ModelRejected, match=problem) as caught:
            parse_specs([{"url": "https://example.com/ok.safetensors", "sha256": SHA, "folder": "vae"}, raw])
        assert caught.value.index == 1


def test_pickle_formats_and_private_hosts_only_where_every_candidate_pool_allows_them() -> None:
    pickled = ModelSpec(url="https://example.com/old.ckpt", sha256=SHA, folder="checkpoints")
    with pytest.raises(ModelRejected, match="pickle formats"):
        ModelPolicy().check_format(pickled)
    ModelPolicy(allow_pickle=True).check_format(pickled)
    both = ModelPolicy.strictest([ModelPolicy(True, True), ModelPolicy(True, False)])
    assert both == ModelPolicy(allow_pickle=True, allow_private=False)
    manifest = [{"url": "https://example.com/old.ckpt", "sha256": SHA, "folder": "checkpoints"}]
    with pytest.raises(ConfigError, match="pickle formats"):
        load_settings(pools=[{"name": "legacy", "models": manifest}])
    allowed = load_settings(pools=[{"name": "legacy", "models": manifest, "allow_pickle_models": True}])
    assert allowed.pools[0].models[0].name == "old.ckpt"


def _slot(
    worker_id: str, *, loaded: tuple[str, ...] = (), files: frozenset[str] = frozenset(), managed: bool = True
) -> Slot:
    return Slot(
        worker_id=worker_id,
        pools=frozenset({"gpu"}),
        free=1,
        assigned=0,
        node_types=None,
        recent_models=loaded,
        manages_models=managed,
        model_files=files,
    )


def test_placement_prefers_loaded_then_on_disk_then_must_fetch_and_needs_a_managed_folder() -> None:
    task = PendingTask(
        id="t",
        priority=0,
        pool=None,
        node_types=frozenset(),
        models=frozenset({"lora.safetensors"}),
        files=frozenset({SHA}),
    )
    loaded = _slot("loaded", loaded=("lora.safetensors",), files=frozenset({SHA}))
    on_disk = _slot("on-disk", files=frozenset({SHA}))
    must_fetch = _slot("must-fetch")
    assert (
        model_affinity(loaded, task) > model_affinity(on_disk, task) > model_affinity(must_fetch, task) == 0
    )
    assert not accepts(_slot("static", managed=False), task)
    assert plan([task], [must_fetch, _slot("static", managed=False), on_disk]) == [("t", "on-disk")]
    assert plan([task], [_slot("static", managed=False)]) == []
