"""A separate OS process that claims from a PostgreSQL store until the queue is empty, the way the
dispatcher does: peek at the head of the queue, then claim those tasks by id.

Usage: ``python claimer.py URL OWNER SEED``. Prints ``ready``, waits for a line on stdin (so several
claimers start together), then prints the claimed task ids as one JSON list, in claim order.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from comfyfleet.store import open_store


async def main(url: str, owner: str, seed: int) -> None:
    rng = random.Random(seed)
    claimed: list[str] = []
    async with open_store(url, max_connections=2) as store:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        while head := await store.peek_pending(limit=rng.randint(1, 10)):
            tasks = await store.claim_ids(owner, 600, [task.id for task in head])
            claimed.extend(task.id for task in tasks)
    print(json.dumps(claimed), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
