"""Output nodes: files named and numbered like upstream's, PNGs carrying the graph, text, latents, socket images."""

from __future__ import annotations

import io
import json
import os
import random
import string
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from comfyfleet.emulators.comfyui.nodes.base import Latent, NodeFailed, NodeOutput, RunContext


def save_path(filename_prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """ComfyUI's ``folder_paths.get_save_image_path``: folder, base name, next counter, subfolder."""
    filename_prefix = filename_prefix.replace("%width%", str(width)).replace("%height%", str(height))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        raise NodeFailed(
            "Exception",
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}",
        )
    key = (full_output_folder, filename)
    cached = _NEXT_COUNTER.get(key)
    if cached is not None and _folder_stamp(full_output_folder) == cached[0]:
        return full_output_folder, filename, cached[1], subfolder
    prefix_len = len(filename)
    counters = []
    try:
        for existing in os.listdir(full_output_folder):
            prefix = existing[: prefix_len + 1]
            if os.path.normcase(prefix[:-1]) == os.path.normcase(filename) and prefix[-1:] == "_":
                try:
                    counters.append(int(existing[prefix_len + 1 :].split("_")[0]))
                except ValueError:
                    counters.append(0)
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
    return full_output_folder, filename, (max(counters) + 1 if counters else 1), subfolder


# Upstream lists the folder on every save, which grows slow with thousands of outputs. The next counter is
# remembered per (folder, prefix) with the folder's mtime after our own write; any other change to the
# folder (a file added or removed by someone else) changes the mtime and brings back the full scan.
_NEXT_COUNTER: dict[tuple[str, str], tuple[int, int]] = {}


def _folder_stamp(folder: str) -> int:
    try:
        return os.stat(folder).st_mtime_ns
    except FileNotFoundError:
        return -1


def saved(folder: str, filename: str, next_counter: int) -> None:
    """Remember where the next save under this prefix starts (call after writing)."""
    if len(_NEXT_COUNTER) >= 10_000:  # PreviewImage draws a new prefix every time
        _NEXT_COUNTER.clear()
    _NEXT_COUNTER[(folder, filename)] = (_folder_stamp(folder), next_counter)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)


def _png_bytes(image: Image.Image, ctx: RunContext) -> bytes:
    info = PngInfo()
    info.add_text("prompt", json.dumps(ctx.prompt))
    for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
        info.add_text(str(key), json.dumps(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


async def _save_images(
    ctx: RunContext, images: list[Image.Image], filename_prefix: str, kind: str
) -> NodeOutput:
    root = ctx.output_dir() if kind == "output" else ctx.temp_dir()
    first = images[0]

    def work() -> list[dict[str, Any]]:
        folder, filename, counter, subfolder = save_path(filename_prefix, root, first.width, first.height)
        results = []
        for batch_number, image in enumerate(images):
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            with open(os.path.join(folder, name), "wb") as file:
                file.write(_png_bytes(image, ctx))
            results.append({"filename": name, "subfolder": subfolder, "type": kind})
            counter += 1
        saved(folder, filename, counter)
        return results

    results = await ctx.cpu(sum(i.width * i.height for i in images), work)
    return (), {"images": results}


async def save_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    return await _save_images(ctx, inputs["images"], inputs["filename_prefix"], "output")


async def preview_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    suffix = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return await _save_images(ctx, inputs["images"], "ComfyUI" + suffix, "temp")


async def save_image_websocket(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["images"]
    for index, image in enumerate(images):
        await ctx.step(index, len(images), (image, "PNG"))
    return (), None


async def save_latent(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    latent: Latent = inputs["samples"]
    folder, filename, counter, subfolder = save_path(
        inputs["filename_prefix"], ctx.output_dir(), latent.width, latent.height
    )
    name = f"{filename}_{counter:05}_.latent"
    # A real (tiny) safetensors container: 8-byte header length, JSON header, no tensors.
    header = json.dumps(
        {
            "__metadata__": {
                "latent_size": f"{latent.width}x{latent.height}x{latent.batch}",
                "material": latent.material[:200],
            }
        }
    ).encode()
    await ctx.cpu(0, lambda: _write(os.path.join(folder, name), len(header).to_bytes(8, "little") + header))
    saved(folder, filename, counter + 1)
    return (), {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]}


async def primitive_string(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    return (str(inputs["value"]),), None


async def save_text(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    text = str(inputs["text"])
    folder, filename, counter, subfolder = save_path(inputs["filename_prefix"], ctx.output_dir(), 0, 0)
    name = f"{filename}_{counter:05}.{inputs['format']}"
    await ctx.cpu(0, lambda: _write(os.path.join(folder, name), text.encode()))
    saved(folder, filename, counter + 1)
    return (), {"text": [text], "files": [{"filename": name, "subfolder": subfolder, "type": "output"}]}
