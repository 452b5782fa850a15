"""Image nodes that do real Pillow work on real pixels."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageFilter, ImageOps

from comfyfleet.emulators.comfyui.nodes.base import NodeFailed, NodeOutput, RunContext, as_int

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


async def empty_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    width, height, batch, color = (as_int(inputs[k]) for k in ("width", "height", "batch_size", "color"))
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)

    def work() -> list[Image.Image]:
        return [Image.new("RGB", (width, height), rgb) for _ in range(batch)]

    return (await ctx.cpu(width * height * batch, work),), None


async def load_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    path = ctx.input_path(inputs["image"])
    if path is None:
        raise NodeFailed("FileNotFoundError", f"[Errno 2] No such file or directory: '{inputs['image']}'")

    def work() -> tuple[list[Image.Image], list[Image.Image]]:
        with Image.open(path) as opened:
            opened.load()
            rgba = opened.convert("RGBA")
        alpha = (
            ImageOps.invert(rgba.getchannel("A"))
            if "A" in opened.getbands()
            else Image.new("L", rgba.size, 0)
        )
        return [rgba.convert("RGB")], [alpha]

    images, masks = await ctx.cpu(0, work)
    return (images, masks), None


async def image_upscale_with_model(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    """Scale by the factor a model's name announces (``2x``/``x2``…), 4 when it names none, as most do."""
    name = inputs["upscale_model"].name.lower()
    factor = next((n for n in (2, 3, 8) if f"{n}x" in name or f"x{n}" in name), 4)
    images: list[Image.Image] = inputs["image"]

    def work() -> list[Image.Image]:
        return [i.resize((i.width * factor, i.height * factor), Image.Resampling.LANCZOS) for i in images]

    return (await ctx.cpu(sum(i.width * i.height for i in images) * factor * factor, work),), None


def _scaled(images: list[Image.Image], method: str, width: int, height: int, crop: str) -> list[Image.Image]:
    result = []
    for image in images:
        target_w = width or max(1, round(image.width * height / image.height))
        target_h = height or max(1, round(image.height * width / image.width))
        if crop == "center":
            result.append(ImageOps.fit(image, (target_w, target_h), _RESAMPLE[method]))
        else:
            result.append(image.resize((target_w, target_h), _RESAMPLE[method]))
    return result


async def image_scale(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images, width, height = inputs["image"], as_int(inputs["width"]), as_int(inputs["height"])
    if width == 0 and height == 0:
        return (images,), None
    return (
        await ctx.cpu(
            width * height * len(images),
            lambda: _scaled(images, inputs["upscale_method"], width, height, inputs["crop"]),
        ),
    ), None


async def image_scale_by(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images, scale = inputs["image"], float(inputs["scale_by"])

    def work() -> list[Image.Image]:
        return [
            image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                _RESAMPLE[inputs["upscale_method"]],
            )
            for image in images
        ]

    return (await ctx.cpu(sum(i.width * i.height for i in images), work),), None


async def image_invert(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["image"]
    return (
        await ctx.cpu(sum(i.width * i.height for i in images), lambda: [ImageOps.invert(i) for i in images]),
    ), None


async def image_blur(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images, sigma = inputs["image"], float(inputs["sigma"])
    return (
        await ctx.cpu(
            sum(i.width * i.height for i in images),
            lambda: [i.filter(ImageFilter.GaussianBlur(sigma)) for i in images],
        ),
    ), None


async def image_sharpen(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["image"]
    radius, alpha = as_int(inputs["sharpen_radius"]), float(inputs["alpha"])
    sharpen = ImageFilter.UnsharpMask(radius=radius, percent=round(100 * alpha), threshold=0)
    return (
        await ctx.cpu(sum(i.width * i.height for i in images), lambda: [i.filter(sharpen) for i in images]),
    ), None
