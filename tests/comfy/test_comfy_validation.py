"""Validation errors have ComfyUI's own types and shapes (must show 2), and graph inspection reads graphs right.

The expected bodies below are the ones captured from a live ComfyUI 0.33 server in the protocol reference
(tracebacks, which carry server paths, are compared for presence only).
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from comfy_helpers import seed_payload, trivial_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyfleet.comfy import workflow
from comfyfleet.comfy.errors import MalformedPrompt
from comfyfleet.domain.graph import Link, iter_links
from comfyfleet.emulators.comfyui import EmulatorOptions, EmulatorServer
from comfyfleet.emulators.comfyui.nodes import Catalogue
from support import eventually


def _without_tracebacks(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: ("<traceback>" if k == "traceback" else _without_tracebacks(v)) for k, v in body.items()}
    if isinstance(body, list):
        return [_without_tracebacks(v) for v in body]
    return body


async def _rejection(emulator: EmulatorServer, graph: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        response = await http.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400
    body: dict[str, Any] = response.json()
    return body


async def test_unknown_class_type(emulator: EmulatorServer) -> None:
    body = await _rejection(emulator, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert body == {
        "error": {
            "type": "missing_node_type",
            "message": "Node 'NoSuchNode' not found. The custom node may not be installed.",
            "details": "Node ID '#1'",
            "extra_info": {"node_id": "1", "class_type": "NoSuchNode", "node_title": "NoSuchNode"},
        },
        "node_errors": {},
    }


async def test_missing_required_input(emulator: EmulatorServer) -> None:
    graph = trivial_graph()
    del graph["1"]["inputs"]["width"]
    body = await _rejection(emulator, graph)
    assert body == {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "1": {
                "errors": [
                    {
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": "width",
                        "extra_info": {"input_name": "width"},
                    }
                ],
                "dependent_outputs": ["2"],
                "class_type": "EmptyImage",
            }
        },
    }


async def test_link_to_a_missing_node(emulator: EmulatorServer) -> None:
    graph = trivial_graph()
    graph["2"]["inputs"]["images"] = ["99", 0]
    body = _without_tracebacks(await _rejection(emulator, graph))
    assert body == {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "Exception when validating node: '99'",
            "extra_info": {},
        },
        "node_errors": {
            "2": {
                "errors": [{"type": "exception_during_validation", "message": "Exception when validating node", "details": "'99'",
                            "extra_info": {"exception_type": "KeyError", "traceback": "<traceback>"}}],
                "dependent_outputs": ["2"],
                "class_type": "SaveImage",
            }
        },
    }  # fmt: skip


async def test_value_not_in_list(emulator: EmulatorServer) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "magic",
                "width": 4,
                "height": 4,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    body = await _rejection(emulator, graph)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert list(body["node_errors"]) == ["2"]
    assert body["node_errors"]["2"]["dependent_outputs"] == ["3"]
    assert body["node_errors"]["2"]["errors"] == [
        {
            "type": "value_not_in_list",
            "message": "Value not in list",
            "details": "upscale_method: 'magic' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']",
            "extra_info": {
                "input_name": "upscale_method",
                "input_config": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
                "received_value": "magic",
            },
        }
    ]
    # Long lists (the sampler names) are elided, as upstream does for model lists.
    graph = seed_payload()
    graph["3"]["inputs"]["sampler_name"] = "nope"
    error = (await _rejection(emulator, graph))["node_errors"]["3"]["errors"][0]
    assert error["details"].startswith("sampler_name: 'nope' not in (list of length ")
    assert error["extra_info"]["input_config"] is None


async def test_other_input_errors(emulator: EmulatorServer) -> None:
    graph = trivial_graph()
    graph["1"]["inputs"]["width"] = 99999
    error = (await _rejection(emulator, graph))["node_errors"]["1"]["errors"][0]
    assert error == {
        "type": "value_bigger_than_max",
        "message": "Value 99999 bigger than max of 16384",
        "details": "width",
        "extra_info": {
            "input_name": "width",
            "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
            "received_value": 99999,
        },
    }
    graph["1"]["inputs"]["width"] = 0
    assert (await _rejection(emulator, graph))["node_errors"]["1"]["errors"][0][
        "type"
    ] == "value_smaller_than_min"
    graph["1"]["inputs"]["width"] = "wide"
    assert (await _rejection(emulator, graph))["node_errors"]["1"]["errors"][0][
        "type"
    ] == "invalid_input_type"

    mismatch = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    error = (await _rejection(emulator, mismatch))["node_errors"]["2"]["errors"][0]
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "images, received_type(LATENT) mismatch input_type(IMAGE)"
    assert error["extra_info"]["linked_node"] == ["1", 0]

    load = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "does_not_exist.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    error = (await _rejection(emulator, load))["node_errors"]["1"]["errors"][0]
    assert error == {
        "type": "custom_validation_failed",
        "message": "Custom validation failed for node",
        "details": "image - Invalid image file: does_not_exist.png",
        "extra_info": {"input_name": "image"},
    }

    cycle = {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    error = (await _rejection(emulator, cycle))["node_errors"]["2"]["errors"][0]
    assert error == {
        "type": "dependency_cycle",
        "message": "Dependency cycle detected",
        "details": "2 (ImageInvert) -> 1 (ImageInvert) -> 2 (ImageInvert)",
        "extra_info": {"node_id": "2", "cycle_nodes": ["2", "1"]},
    }

    bad_link = trivial_graph()
    bad_link["2"]["inputs"]["images"] = ["1", 0, 0]
    assert (await _rejection(emulator, bad_link))["node_errors"]["2"]["errors"][0][
        "type"
    ] == "bad_linked_input"
    int_link = trivial_graph()
    int_link["2"]["inputs"]["images"] = [1, 0]
    error = (await _rejection(emulator, int_link))["node_errors"]["2"]["errors"][0]
    assert (error["type"], error["details"]) == ("exception_during_validation", "1")


async def test_top_level_rejections(emulator: EmulatorServer) -> None:
    no_outputs = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    }
    assert await _rejection(emulator, no_outputs) == {
        "error": {
            "type": "prompt_no_outputs",
            "message": "Prompt has no outputs",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {},
    }
    no_class = await _rejection(emulator, {"1": {"inputs": {}}})
    assert no_class["error"]["type"] == "missing_node_type"
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        response = await http.post("/prompt", json={"client_id": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "no_prompt"


async def test_partial_validity_is_accepted_with_node_errors(emulator: EmulatorServer) -> None:
    graph = trivial_graph(3)
    graph["3"] = {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "bad"}}
    graph["1"]["inputs"]["width"] = "8"  # scalars are coerced
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        response = await http.post("/prompt", json={"prompt": graph})
        assert response.status_code == 200
        body = response.json()
        assert list(body["node_errors"]) == ["3"]
        prompt_id = body["prompt_id"]
        await eventually(lambda: prompt_id in emulator.state.history)
        entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert list(entry["outputs"]) == ["2"]
    assert entry["status"]["status_str"] == "success"
    assert entry["prompt"][4] == ["2"]
    assert entry["prompt"][2]["1"]["inputs"]["width"] == 8


async def test_client_side_validation_matches_the_server(emulator: EmulatorServer) -> None:
    """workflow.validate against a worker's object_info gives the server's own answer."""
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        object_info = (await http.get("/object_info")).json()
        graphs = []
        missing = trivial_graph()
        del missing["1"]["inputs"]["color"]
        graphs.append(missing)
        mismatch = seed_payload()
        mismatch["8"]["inputs"]["samples"] = ["4", 0]
        graphs.append(mismatch)
        graphs.append({"1": {"class_type": "Nope", "inputs": {}}})
        for graph in graphs:
            server = (await http.post("/prompt", json={"prompt": copy.deepcopy(graph)})).json()
            local = workflow.validate(copy.deepcopy(graph), object_info)
            assert not local.ok
            assert _without_tracebacks(local.response()) == _without_tracebacks(server)
    ok = workflow.validate(seed_payload(), object_info, accept_combo=lambda *_: True)
    assert ok.ok
    assert ok.good_outputs == ["9"]


def test_inspection_of_the_seed_workflow() -> None:
    graph = seed_payload()
    assert workflow.node_types(graph) == {
        "KSampler",
        "CheckpointLoaderSimple",
        "EmptyLatentImage",
        "CLIPTextEncode",
        "VAEDecode",
        "SaveImage",
    }
    assert workflow.model_names(graph) == {"flux1-dev-fp8.safetensors"}
    (reference,) = workflow.model_references(graph)
    assert (reference.node_id, reference.input_name, reference.folder) == ("4", "ckpt_name", "checkpoints")
    links = list(iter_links(graph))  # the one graph model that validation at the door uses too
    assert Link(node_id="6", input_name="clip", source_id="4", output_index=1) in links
    assert len(links) == 9
    assert workflow.input_files(graph) == []
    lora_graph = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "LoraLoader",
            "inputs": {"lora_name": "pixel.safetensors", "model": ["1", 0], "clip": ["3", 0]},
        },
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "flux"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "sub/in.png"}},
    }
    assert {(r.folder, r.name) for r in workflow.model_references(lora_graph)} == {
        ("diffusion_models", "flux1-dev.safetensors"), ("loras", "pixel.safetensors"),
        ("text_encoders", "clip_l.safetensors"), ("vae", "ae.safetensors"),
    }  # fmt: skip
    assert workflow.input_files(lora_graph) == ["sub/in.png"]
    with pytest.raises(MalformedPrompt):
        workflow.node_types({"1": "not a node"})
    with pytest.raises(MalformedPrompt):
        workflow.validate(["not", "a", "dict"], {})  # type: ignore[arg-type]


_OBJECT_INFO = Catalogue(EmulatorOptions(), "input-folder-that-does-not-exist").object_info()
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False), st.text(max_size=8)
)
_values = st.one_of(
    _scalars,
    st.lists(st.one_of(st.sampled_from(["1", "2", "3", "99"]), st.integers(-1, 3)), max_size=3),
    st.dictionaries(st.text(max_size=3), _scalars, max_size=2),
)
_nodes = st.fixed_dictionaries(
    {
        "class_type": st.sampled_from([*sorted(_OBJECT_INFO), "Unknown"]),
        "inputs": st.dictionaries(
            st.sampled_from(
                ["image", "images", "width", "height", "color", "batch_size", "filename_prefix", "samples"]
            ),
            _values,
            max_size=5,
        ),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["1", "2", "3", "4"]), _nodes, min_size=1, max_size=4))
def test_validate_never_crashes_and_always_answers_in_comfyuis_shape(graph: dict[str, Any]) -> None:
    result = workflow.validate(graph, _OBJECT_INFO)
    if result.ok:
        assert result.error is None
        assert result.good_outputs
    else:
        assert result.error is not None
        assert set(result.error) == {"type", "message", "details", "extra_info"}
        assert result.error["type"] in {
            "missing_node_type",
            "prompt_no_outputs",
            "prompt_outputs_failed_validation",
        }
    for node_id, node_error in result.node_errors.items():
        assert node_id in graph
        assert set(node_error) == {"errors", "dependent_outputs", "class_type"}
        assert node_error["errors"]
        assert all(
            set(error) == {"type", "message", "details", "extra_info"} for error in node_error["errors"]
        )
