"""What ``comfyfleet models list`` prints: each host's model cache, then each pool's manifest per worker."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from comfyfleet.humanize import size
from comfyfleet.sdk.console import _client, _list_table, _print_json
from comfyfleet.sdk.reporting import out, reporting


def run_models_list(*, as_json: bool, server: str | None, api_key: str | None) -> None:
    with reporting(), _client(server, api_key) as client:
        listing = client.models()
    if as_json:
        _print_json(listing)
        return
    for host in listing.get("hosts", []):
        _print_host(host)
    for pool in listing.get("pools", []):
        if pool.get("models"):
            _print_pool(pool)


def _print_host(host: dict[str, Any]) -> None:
    files = host.get("files", [])
    out.print(
        f"host {escape(str(host.get('host')))}: {size(host.get('used_bytes'))} of "
        f"{size(host.get('budget_bytes'))} in {len(files)} file{'s' if len(files) != 1 else ''}"
    )
    if files:
        table = _list_table(["SHA256", "SIZE", "PINNED", "NAMES", "WORKERS"], keep_whole={"SHA256", "SIZE"})
        for entry in reversed(files):  # most recently used first
            table.add_row(
                escape(str(entry.get("sha256", ""))[:12]),
                size(entry.get("size")),
                "yes" if entry.get("pinned") else "no",
                escape(", ".join(entry.get("names") or []) or "-"),
                escape(", ".join(entry.get("workers") or []) or "-"),
            )
        out.print(table)
    for fetching in host.get("fetching", []):
        names = ", ".join(fetching.get("names") or []) or str(fetching.get("sha256", ""))[:12]
        out.print(
            f"fetching {escape(names)}: {size(fetching.get('bytes'))} of {size(fetching.get('total_bytes'))}"
        )


def _print_pool(pool: dict[str, Any]) -> None:
    names = ", ".join(f"{spec.get('folder')}/{spec.get('name')}" for spec in pool.get("models", []))
    out.print(f"pool {escape(str(pool.get('pool')))}: {escape(names)}")
    for worker in pool.get("workers", []):
        models = worker.get("models") or {}
        state = str(models.get("state") or "waiting")
        if state == "fetching":
            state += (
                f" {models.get('done_files', 0)}/{models.get('files', '?')} ({size(models.get('bytes'))})"
            )
        elif state == "failed":
            state += f": {models.get('error')}"
        out.print(f"  {escape(str(worker.get('worker_id')))} ({worker.get('state')}): {escape(state)}")
