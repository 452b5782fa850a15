"""Moving a waiting task up the queue from the CLI (``comfyfleet tasks priority``) while its live event stream
watches: the stream reports the new queue position."""

from __future__ import annotations

import asyncio
from pathlib import Path

from usage_helpers import cli

from comfyfleet import AsyncClient
from comfyfleet.sdk.reporting import EXIT_REJECTED
from support import running_fleet, tiny_workflow


async def test_the_cli_moves_a_task_up_and_its_stream_says_so(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, workers=0) as fleet, AsyncClient(fleet.url) as client:
        tasks = [await client.submit(tiny_workflow(color=color)) for color in range(3)]
        last = tasks[-1]
        positions: list[int] = []
        heard_three = asyncio.Event()

        async def follow() -> None:
            async for event in client.events(last.id):
                position = (
                    event.task.queue_position
                    if event.type == "snapshot" and event.task
                    else event.data.get("queue_position")
                )
                if event.type == "queue_position":
                    assert "estimated_start_s" in event.data  # null here: no worker to base it on
                if position is not None:
                    positions.append(position)
                    heard_three.set()
                if positions[-1:] == [1]:
                    return

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(heard_three.wait(), 10)
        code, stdout, _ = await cli("tasks", "priority", last.id, "7", "--server", fleet.url)
        assert code == 0
        assert f"task {last.id}: priority 7, queue position 1" in stdout
        await asyncio.wait_for(follower, 10)
        assert positions == [3, 1]
        assert (await client.get(tasks[0].id)).queue_position == 2

        await client.cancel(tasks[0].id)
        code, _, stderr = await cli("tasks", "priority", tasks[0].id, "9", "--server", fleet.url)
        assert code == EXIT_REJECTED
        assert "only a pending task can be changed" in stderr
