"""The graphs the tests submit: the seed's example (one copy, ``data/seed_task.json``: the README's curl body)
and the cheapest graph that writes a file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

SEED_TASK: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "seed_task.json").read_text())


def seed_body() -> dict[str, Any]:
    """A fresh copy of the seed's curl example body (``workflow_id``, ``priority``, ``payload``)."""
    return copy.deepcopy(SEED_TASK)


def seed_workflow(**changes: Any) -> dict[str, Any]:
    """The seed's example graph (KSampler … SaveImage, 512x512); ``changes`` patch KSampler's inputs
    (another ``seed`` keeps two tasks from sharing a cached result)."""
    graph: dict[str, Any] = copy.deepcopy(SEED_TASK["payload"])
    graph["3"]["inputs"].update(changes)
    return graph


def tiny_workflow(color: int = 0x3366CC, size: int = 32, prefix: str = "tiny") -> dict[str, Any]:
    """EmptyImage → SaveImage: the cheapest graph that writes a file. Vary ``color`` to avoid the node cache."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
