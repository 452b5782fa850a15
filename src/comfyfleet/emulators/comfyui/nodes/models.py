"""Loaders, conditioning, latents and the sampler: model descriptors and text "material", no tensors."""

from __future__ import annotations

import hashlib
from typing import Any

from PIL import Image

from comfyfleet.emulators.comfyui.nodes.base import Latent, Model, NodeOutput, RunContext, as_int, synthesize


async def checkpoint_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    name = inputs["ckpt_name"]
    await ctx.load_model("checkpoints", name)
    return (Model("MODEL", name), Model("CLIP", name), Model("VAE", name)), None


async def unet_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("diffusion_models", inputs["unet_name"])
    return (Model("MODEL", inputs["unet_name"]),), None


async def vae_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("vae", inputs["vae_name"])
    return (Model("VAE", inputs["vae_name"]),), None


async def clip_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("text_encoders", inputs["clip_name"])
    return (Model("CLIP", inputs["clip_name"]),), None


async def upscale_model_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("upscale_models", inputs["model_name"])
    return (Model("UPSCALE_MODEL", inputs["model_name"]),), None


async def lora_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    name = inputs["lora_name"]
    await ctx.load_model("loras", name)
    patch = f"{name}@{inputs['strength_model']}/{inputs['strength_clip']}"
    model, clip = inputs["model"], inputs["clip"]
    return (
        Model(model.kind, model.name, [*model.patches, patch]),
        Model(clip.kind, clip.name, [*clip.patches, patch]),
    ), None


async def clip_text_encode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    clip = inputs["clip"]
    return ({"text": inputs["text"], "clip": clip.name, "patches": list(clip.patches)},), None


async def empty_latent(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    width, height, batch = as_int(inputs["width"]), as_int(inputs["height"]), as_int(inputs["batch_size"])
    return (Latent(width, height, batch, "empty"),), None


async def ksampler(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    steps = as_int(inputs["steps"])
    for step in range(1, steps + 1):
        await ctx.step(step, steps, ctx.sampler_preview(step))
    latent, model = inputs["latent_image"], inputs["model"]
    material = "|".join(
        str(part)
        for part in (
            latent.material, model.name, ",".join(model.patches), inputs["seed"], steps, inputs["cfg"],
            inputs["sampler_name"], inputs["scheduler"], inputs["denoise"],
            inputs["positive"]["text"], inputs["negative"]["text"],
        )
    )  # fmt: skip
    return (Latent(latent.width, latent.height, latent.batch, material),), None


async def vae_decode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    latent = inputs["samples"]
    material = f"{latent.material}|vae={inputs['vae'].name}"

    def work() -> list[Image.Image]:
        return [synthesize(material, latent.width, latent.height, index) for index in range(latent.batch)]

    return (await ctx.cpu(latent.width * latent.height * latent.batch, work),), None


async def vae_encode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images: list[Image.Image] = inputs["pixels"]
    digest = hashlib.sha256(b"".join(image.resize((8, 8)).tobytes() for image in images)).hexdigest()
    width, height = images[0].size
    return (Latent(width, height, len(images), f"encoded:{digest}"),), None
