"""The ``comfyfleet`` command. Logging and signal handling are set up here and nowhere else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="comfyfleet",
    help="Self-hosted serverless ComfyUI: a durable priority queue and an autoscaling fleet of ComfyUI workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", envvar="COMFYFLEET_CONFIG", help="YAML config file.", show_default=False),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="COMFYFLEET_STORE",
        help="Store URL: sqlite:///path.db (default sqlite:///comfyfleet.db) or postgresql://user@host/db.",
        show_default=False,
    ),
]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(envvar="COMFYFLEET_HOST", help="Address to listen on [default: 127.0.0.1].", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(envvar="COMFYFLEET_PORT", help="Port to listen on [default: 8080].", show_default=False)] = None,
    store: StoreOption = None,
    config: ConfigOption = None,
    worker: Annotated[
        list[str] | None,
        typer.Option("--worker", envvar="COMFYFLEET_WORKERS", help="URL of a ComfyUI server to use as a static worker (repeatable).", show_default=False),
    ] = None,
    outputs: Annotated[
        str | None,
        typer.Option(envvar="COMFYFLEET_OUTPUTS", help="Directory for output files [default: ./comfyfleet-outputs].", show_default=False),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="COMFYFLEET_LOG_LEVEL", help="Log level.")] = "info",
) -> None:
    """Run the API, the dispatcher and the worker manager."""
    from comfyfleet.config import ConfigError, load_settings
    from comfyfleet.runtime import StartupError
    from comfyfleet.runtime import serve as run_server

    _configure_logging(log_level)
    try:
        settings = load_settings(host=host, port=port, store=store, config=config, workers=worker or None, outputs=outputs)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    try:
        run_server(settings)
    except StartupError as exc:
        raise _fail(str(exc), code=1) from None


@app.command()
def migrate(store: StoreOption = None, config: ConfigOption = None) -> None:
    """Apply pending database migrations and exit."""
    import asyncio

    from comfyfleet.config import ConfigError, load_settings
    from comfyfleet.store import StoreError, open_store

    try:
        settings = load_settings(store=store, config=config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None

    async def run() -> list[int]:
        async with open_store(settings.store) as opened:
            return await opened.migrate()

    try:
        applied = asyncio.run(run())
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"applied migrations: {', '.join(map(str, applied))}" if applied else "store is up to date")


@app.command("hash-key")
def hash_key(key: Annotated[str, typer.Argument(help="The API key to hash for the config file.")]) -> None:
    """Print the sha256 hash of an API key, for ``api_keys[].key_hash`` in the config file."""
    from comfyfleet.config import hash_api_key

    typer.echo(hash_api_key(key))


def main() -> None:
    app()
