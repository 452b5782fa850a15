"""``POST /api/v1/workflows/validate``, the SDK's ``validate`` and ``comfyfleet validate``: will a workflow run
on the fleet, asked before submitting it, against two emulator workers that hold different model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from usage_helpers import cli, write

from comfyfleet import AsyncClient
from comfyfleet.sdk.reporting import EXIT_REJECTED
from support import running_fleet, seed_workflow

# Each worker has one checkpoint of its own and lists only the models it has (as a real ComfyUI does).
WORKERS = [
    {"accept_any_model": False, "models": {"checkpoints": ["only_on_first.safetensors"]}},
    {"accept_any_model": False, "models": {"checkpoints": ["only_on_second.safetensors"]}},
]


def with_checkpoint(name: str) -> dict[str, Any]:
    graph = seed_workflow()
    graph["4"]["inputs"]["ckpt_name"] = name
    return graph


async def test_a_workflow_is_checked_against_every_workers_nodes_and_models(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2, emulator=WORKERS) as fleet:
        for name in ("only_on_first.safetensors", "only_on_second.safetensors"):
            answer = await fleet.http.post(
                "/api/v1/workflows/validate", json={"payload": with_checkpoint(name)}
            )
            assert answer.status_code == 200, answer.text
            report = answer.json()
            assert report["valid"] is True, report
            assert report["checked_against"] == "workers"
            assert report["models"] == [
                {"node_id": "4", "input_name": "ckpt_name", "folder": "checkpoints", "name": name}
            ]
            assert "KSampler" in report["node_types"]

        # A model no worker has: ComfyUI's own error, on the node that names it.
        report = (
            await fleet.http.post(
                "/api/v1/workflows/validate", json={"payload": with_checkpoint("nowhere.safetensors")}
            )
        ).json()
        assert report["valid"] is False
        [problem] = report["node_errors"]["4"]["errors"]
        assert problem["type"] == "value_not_in_list"
        assert "nowhere.safetensors" in problem["details"]

        # Custom nodes not installed: every missing type is named at once.
        graph = seed_workflow()
        graph["10"] = {"class_type": "FaceDetailer", "inputs": {"image": ["8", 0]}}
        graph["11"] = {"class_type": "UltimateSDUpscale", "inputs": {"image": ["10", 0]}}
        report = (await fleet.http.post("/api/v1/workflows/validate", json={"payload": graph})).json()
        assert report["valid"] is False
        assert report["missing_node_types"] == ["FaceDetailer", "UltimateSDUpscale"]
        assert report["error"]["type"] == "missing_node_type"

        # A value of the wrong type, as ComfyUI would report it.
        report = (
            await fleet.http.post("/api/v1/workflows/validate", json={"payload": seed_workflow(steps="many")})
        ).json()
        assert report["valid"] is False
        assert report["node_errors"]["3"]["errors"][0]["type"] == "invalid_input_type"

        # The gateway's catalogue lists the models of both workers.
        info = (await fleet.http.get("/object_info/CheckpointLoaderSimple")).json()
        options = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert set(options) == {"only_on_first.safetensors", "only_on_second.safetensors"}

        # Nothing was stored or sent to a worker.
        assert (await fleet.http.get("/api/v1/tasks")).json()["count"] == 0
        assert (
            sum(
                emulator.stats.prompts_accepted + emulator.stats.prompts_rejected
                for emulator in fleet.emulators
            )
            == 0
        )


async def test_structure_is_checked_first_and_alone_without_workers(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=0) as fleet:
        broken = seed_workflow()
        broken["8"]["inputs"]["samples"] = ["99", 0]
        report = (await fleet.http.post("/api/v1/workflows/validate", json={"payload": broken})).json()
        assert report["valid"] is False
        assert report["checked_against"] == "structure"
        assert [(e["node_id"], e["input_name"]) for e in report["errors"]] == [("8", "samples")]

        report = (
            await fleet.http.post("/api/v1/workflows/validate", json={"payload": seed_workflow()})
        ).json()
        assert (report["valid"], report["checked_against"]) == (True, "structure")
        # No worker was ever up here: ComfyUI clients are told to come back.
        missing = await fleet.http.get("/object_info")
        assert (missing.status_code, missing.json()["error"]) == (503, "no_workers")

        refused = await fleet.http.post("/api/v1/workflows/validate", json={"graph": seed_workflow()})
        assert refused.status_code == 422
        assert refused.json()["code"] == 422


async def test_sdk_and_cli_validate(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2, emulator=WORKERS) as fleet:
        async with AsyncClient(fleet.url) as client:
            assert (await client.validate(with_checkpoint("only_on_second.safetensors")))["valid"] is True
            assert (await client.validate(with_checkpoint("nowhere.safetensors")))["valid"] is False

        good = write(tmp_path / "good.json", with_checkpoint("only_on_first.safetensors"))
        code, stdout, _ = await cli("validate", str(good), "--server", fleet.url)
        assert code == 0
        assert "valid, checked against the fleet's workers" in stdout

        bad = write(tmp_path / "bad.json", with_checkpoint("nowhere.safetensors"))
        code, _, stderr = await cli("validate", str(bad), "--server", fleet.url)
        assert code == EXIT_REJECTED
        assert "would not run" in stderr
        assert "node 4 (CheckpointLoaderSimple): Value not in list" in stderr
        assert "nowhere.safetensors" in stderr


async def test_the_catalogue_outlives_a_restart_with_no_worker_up(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=2, emulator=WORKERS) as fleet:
        live = (await fleet.http.get("/object_info")).json()
        assert (
            "only_on_second.safetensors"
            in live["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        )

    # The same server (store and outputs) started again with its pool at zero: nothing answers, but the
    # catalogue its workers offered is kept, so validation and ComfyUI clients still know the nodes.
    async with running_fleet(tmp_path, workers=0) as restarted:
        assert (await restarted.http.get("/object_info")).json() == live
        report = (
            await restarted.http.post(
                "/api/v1/workflows/validate", json={"payload": with_checkpoint("nowhere.safetensors")}
            )
        ).json()
        assert (report["valid"], report["checked_against"]) == (False, "workers")
        assert report["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
