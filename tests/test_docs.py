"""The reference pages stay true to the code they describe.

- docs/configuration.md has a table row for every setting of ``comfyfleet.config.Settings`` (nested ones by
  dotted name, list entries as ``pools[].name``) with its environment variable and its default, names no
  setting that does not exist, and its annotated example is a valid configuration;
- docs/cli.md has a section for every ``comfyfleet`` command (sub-commands included) that names each of
  its options and their environment variables;
- docs/api.md names every route under ``/api/v1`` of the app built by ``comfyfleet.runtime.create_app``;
- relative links between the pages (and from the README) lead to files and headings that exist.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from starlette.routing import BaseRoute, Mount

from comfyfleet.cli import app as cli_app
from comfyfleet.config import Settings, load_settings
from comfyfleet.runtime import create_app
from comfyfleet.store import open_store

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ENV_PREFIX = "COMFYFLEET_"
API_PREFIX = "/api/v1"


# -- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettingDoc:
    """What docs/configuration.md must say about one setting."""

    name: str  # dotted, e.g. "dispatch.lease_s" or "pools[].min_workers"
    env: str | None  # None: a field of a list entry, without a variable of its own
    required: bool
    default: Any


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _model_of(item)
    return None


def _default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def documented_settings(
    model: type[BaseModel] = Settings, prefix: str = "", env_prefix: str | None = ENV_PREFIX
) -> Iterator[SettingDoc]:
    """Every setting a user can set, walking nested models (``dispatch.lease_s``) and list entries
    (``pools[].name``)."""
    for name, field in model.model_fields.items():
        dotted = prefix + name
        env = f"{env_prefix}{name.upper()}" if env_prefix is not None else None
        nested = _model_of(field.annotation)
        if nested is not None:
            yield from documented_settings(nested, dotted + ".", f"{env}__" if env is not None else None)
            continue
        yield SettingDoc(dotted, env, field.is_required(), None if field.is_required() else _default(field))
        item = _list_item_model(field.annotation)
        if item is not None:
            yield from documented_settings(item, dotted + "[].", None)


_ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|(?P<env>[^|]*)\|(?P<default>[^|]*)\|")


def configuration_rows(text: str) -> dict[str, tuple[str, str]]:
    """Setting name → (environment cell, default cell) for every row of the settings tables."""
    section = text.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match:
            rows[match["name"]] = (match["env"].strip(), match["default"].strip())
    return rows


def test_walk_of_settings_reaches_nested_and_list_fields() -> None:
    names = {setting.name: setting for setting in documented_settings()}
    assert names["dispatch.lease_s"].env == "COMFYFLEET_DISPATCH__LEASE_S"
    assert names["pools"].env == "COMFYFLEET_POOLS"
    assert names["pools[].min_workers"].env is None
    assert names["pools[].name"].required


def test_configuration_page_has_every_setting_with_its_variable_and_default() -> None:
    rows = configuration_rows((DOCS / "configuration.md").read_text())
    problems = []
    expected = list(documented_settings())
    for setting in expected:
        if setting.name not in rows:
            problems.append(f"{setting.name}: no row")
            continue
        env_cell, default_cell = rows[setting.name]
        if setting.env is not None and f"`{setting.env}`" not in env_cell:
            problems.append(
                f"{setting.name}: environment column should say `{setting.env}`, says {env_cell!r}"
            )
        if setting.required:
            if "required" not in default_cell:
                problems.append(f"{setting.name}: default column should say required")
            continue
        shown = re.match(r"`([^`]*)`", default_cell)
        if shown is None:
            problems.append(f"{setting.name}: default column should show `{setting.default!r}`")
        elif yaml.safe_load(shown[1]) != setting.default:
            problems.append(f"{setting.name}: default shown as {shown[1]!r}, is {setting.default!r}")
    unknown = sorted(set(rows) - {setting.name for setting in expected})
    problems += [f"{name}: documented but not a setting" for name in unknown]
    assert not problems, "docs/configuration.md is out of date:\n" + "\n".join(problems)


def test_annotated_example_is_a_valid_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DOCS / "configuration.md").read_text()
    example = text.split("\n## Annotated example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "fleet.yaml"
    path.write_text(example)
    for variable in [name for name in os.environ if name.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(variable)
    settings = load_settings(config=path)
    assert settings.pools
    assert settings.api_keys
    assert settings.outputs == str(tmp_path / "outputs")  # relative to the file, as the page says


def test_quickstart_configuration_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [name for name in os.environ if name.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(variable)
    settings = load_settings(config=ROOT / "examples" / "quickstart.yaml")
    assert [pool.provider for pool in settings.pools] == ["process"]
    assert settings.pools[0].warmup is not None  # examples/warmup.json, read relative to the file


# -- command line ------------------------------------------------------------------------------------------
def cli_commands() -> Iterator[tuple[str, Any]]:
    """``("comfyfleet tasks list", command)`` for every command that runs something (groups are walked).

    Typer builds click-style command objects (its own copy of click in recent versions), so they are
    recognised by what they have: a group has ``commands``, an option has ``param_type_name == "option"``."""

    def walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, command

    yield from walk(typer.main.get_command(cli_app), "comfyfleet")


def cli_sections(text: str) -> dict[str, str]:
    """Command path → the text of its section: from a heading that names `comfyfleet …` to the next
    heading of the same or a higher level."""
    lines = text.splitlines()
    headings = [
        (index, len(line) - len(line.lstrip("#")))
        for index, line in enumerate(lines)
        if re.match(r"#{1,6} ", line)
    ]
    sections: dict[str, str] = {}
    for position, (index, level) in enumerate(headings):
        named = re.search(r"`(comfyfleet(?: [a-z][a-z-]*)*)", lines[index])
        if named is None:
            continue
        end = next(
            (later for later, later_level in headings[position + 1 :] if later_level <= level), len(lines)
        )
        sections[named[1]] = "\n".join(lines[index:end])
    return sections


def test_walk_of_the_cli_reaches_sub_commands() -> None:
    paths = dict(cli_commands())
    assert {"comfyfleet serve", "comfyfleet tasks list", "comfyfleet workers drain"} <= set(paths)


def test_cli_page_has_every_command_option_and_variable() -> None:
    sections = cli_sections((DOCS / "cli.md").read_text())
    problems = []
    for path, command in cli_commands():
        section = sections.get(path)
        if section is None:
            problems.append(f"{path}: no heading naming `{path}`")
            continue
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            for flag in [*param.opts, *param.secondary_opts]:
                if not re.search(rf"`{re.escape(flag)}(?![\w-])", section):
                    problems.append(f"{path}: option `{flag}` not in its section")
            variables = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
            for variable in variables:
                if f"`{variable}`" not in section:
                    problems.append(f"{path}: environment variable `{variable}` not in its section")
    assert not problems, "docs/cli.md is out of date:\n" + "\n".join(problems)


# -- HTTP API ----------------------------------------------------------------------------------------------
def route_paths(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every HTTP route, looking inside mounts and included routers."""
    for route in routes:
        # FastAPI ≥ 0.116 keeps included routers as one route object carrying the prefix.
        included = getattr(route, "include_context", None)
        if included is not None:
            yield from route_paths(included.included_router.routes, prefix + included.prefix)
            continue
        if isinstance(route, Mount):
            yield from route_paths(list(route.routes), prefix + route.path)
            continue
        path = getattr(route, "path", None)
        for method in sorted(getattr(route, "methods", None) or ()):
            if isinstance(path, str) and method != "HEAD":
                yield method, prefix + path


@pytest.fixture
def api_routes(tmp_path: Path) -> set[tuple[str, str]]:
    settings = Settings(store=f"sqlite:///{tmp_path / 'docs.db'}")
    app = create_app(settings, open_store(settings.store))  # building the app does not touch the store
    routes = {(method, path) for method, path in route_paths(app.routes) if path.startswith(API_PREFIX)}
    # The walk must see at least what the app's own OpenAPI schema lists, or it silently misses routers.
    in_schema = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith(API_PREFIX)
        for method in operations
    }
    assert in_schema <= routes
    assert ("POST", f"{API_PREFIX}/tasks") in routes
    return routes


def test_api_page_has_every_v1_route(api_routes: set[tuple[str, str]]) -> None:
    text = (DOCS / "api.md").read_text()
    missing = sorted(f"{method} {path}" for method, path in api_routes if f"{method} {path}" not in text)
    assert not missing, "docs/api.md does not describe: " + ", ".join(missing)


# -- links -------------------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_relative_links_lead_somewhere() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    problems = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                problems.append(f"{page.relative_to(ROOT)}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{page.relative_to(ROOT)}: {target} names no heading of {linked.name}")
    assert not problems, "\n".join(problems)


def test_pages_name_no_path_of_a_particular_machine() -> None:
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        found = re.findall(r"(?<![\w.])/(?:work|root|home/\w+)/", page.read_text())
        assert not found, f"{page.relative_to(ROOT)} names {found}"


def test_index_maps_every_page() -> None:
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)(?:#[^)]*)?\)", index))
    missing = sorted(
        page.name for page in DOCS.glob("*.md") if page.name != "index.md" and page.name not in linked
    )
    assert not missing, "docs/index.md does not link " + ", ".join(missing)


def test_design_module_map_has_a_row_for_every_package_and_module() -> None:
    """docs/design.md's module map names each package and top-level module of src/comfyfleet, and nothing else."""
    design = (DOCS / "design.md").read_text()
    map_section = design.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z0-9_]+/|[a-z0-9_]+\.py)` \|", map_section, re.M))
    source = ROOT / "src" / "comfyfleet"
    present = {path.name + "/" for path in source.iterdir() if (path / "__init__.py").exists()}
    present |= {path.name for path in source.glob("*.py") if path.name not in ("__init__.py", "__main__.py")}
    assert rows == present, (
        f"missing rows: {sorted(present - rows)}; rows of nothing: {sorted(rows - present)}"
    )
