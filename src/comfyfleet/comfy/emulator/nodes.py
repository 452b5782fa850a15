"""The emulator's node catalogue: real ComfyUI input names, types, defaults and ranges, simulated behaviour.

Values that flow between nodes are small Python objects: models are descriptors, a LATENT remembers its
size and a text "material" (seed, prompts, sampler settings) from which VAEDecode synthesises pixels, and
IMAGE is a list of real Pillow images so that the image nodes do real work on real pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import string
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:
    from comfyfleet.comfy.emulator.options import EmulatorOptions

MAX_RESOLUTION = 16384
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image"]  # fmt: skip
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
# Above this many pixels, Pillow work runs in a thread so the server keeps answering meanwhile.
THREAD_PIXELS = 256 * 256


class NodeFailed(Exception):
    """A node raised at run time: becomes an ``execution_error`` with these type and message."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


class RunContext(Protocol):
    """What the executor offers a running node."""

    node_id: str
    options: EmulatorOptions
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]

    async def step(self, value: int, total: int) -> None:
        """Spend one progress step (``step_time_s``), check for interrupts, report ``progress``."""

    async def load_model(self, folder: str, name: str) -> None: ...

    async def cpu(self, pixels: int, work: Callable[[], Any]) -> Any:
        """Run Pillow work, in a thread when it is big."""

    def output_dir(self) -> str: ...
    def temp_dir(self) -> str: ...
    def input_path(self, name: str) -> str | None: ...
    async def send_image(self, image: Image.Image, image_format: str) -> None: ...


@dataclass(slots=True)
class Latent:
    width: int
    height: int
    batch: int
    material: str


@dataclass(slots=True)
class Model:
    kind: str
    name: str
    patches: list[str] = field(default_factory=list)


NodeOutput = tuple[tuple[Any, ...], dict[str, Any] | None]
Runner = Callable[[RunContext, dict[str, Any]], Awaitable[NodeOutput]]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    display_name: str
    category: str
    required: Mapping[str, Any]  # input name -> spec list, or a callable(Catalogue) -> spec list
    outputs: tuple[str, ...]
    run: Runner
    optional: Mapping[str, Any] = field(default_factory=dict)
    hidden: Mapping[str, str] = field(default_factory=dict)
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    description: str = ""
    validate: Mapping[str, Callable[[str, Mapping[str, Any]], bool | str]] | None = None


def synthesize(material: str, width: int, height: int, index: int) -> Image.Image:
    """A smooth, deterministic picture: a 4x4 colour field from a hash of everything that made it, upscaled."""
    digest = hashlib.shake_256(f"{material}|{width}x{height}|{index}".encode()).digest(48)
    return Image.frombytes("RGB", (4, 4), digest).resize((width, height), Image.Resampling.BICUBIC)


def _int(value: Any) -> int:
    return int(value)


# --- node behaviours -------------------------------------------------------------------------------


async def _checkpoint_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    name = inputs["ckpt_name"]
    await ctx.load_model("checkpoints", name)
    return (Model("MODEL", name), Model("CLIP", name), Model("VAE", name)), None


async def _unet_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("diffusion_models", inputs["unet_name"])
    return (Model("MODEL", inputs["unet_name"]),), None


async def _vae_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("vae", inputs["vae_name"])
    return (Model("VAE", inputs["vae_name"]),), None


async def _clip_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    await ctx.load_model("text_encoders", inputs["clip_name"])
    return (Model("CLIP", inputs["clip_name"]),), None


async def _lora_loader(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    name = inputs["lora_name"]
    await ctx.load_model("loras", name)
    patch = f"{name}@{inputs['strength_model']}/{inputs['strength_clip']}"
    model, clip = inputs["model"], inputs["clip"]
    return (
        Model(model.kind, model.name, [*model.patches, patch]),
        Model(clip.kind, clip.name, [*clip.patches, patch]),
    ), None


async def _clip_text_encode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    clip = inputs["clip"]
    return ({"text": inputs["text"], "clip": clip.name, "patches": list(clip.patches)},), None


async def _empty_latent(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    width, height, batch = _int(inputs["width"]), _int(inputs["height"]), _int(inputs["batch_size"])
    return (Latent(width, height, batch, "empty"),), None


async def _ksampler(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    steps = _int(inputs["steps"])
    for step in range(1, steps + 1):
        await ctx.step(step, steps)
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


async def _vae_decode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    latent = inputs["samples"]
    material = f"{latent.material}|vae={inputs['vae'].name}"

    def work() -> list[Image.Image]:
        return [synthesize(material, latent.width, latent.height, index) for index in range(latent.batch)]

    return (await ctx.cpu(latent.width * latent.height * latent.batch, work),), None


async def _vae_encode(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images: list[Image.Image] = inputs["pixels"]
    digest = hashlib.sha256(b"".join(image.resize((8, 8)).tobytes() for image in images)).hexdigest()
    width, height = images[0].size
    return (Latent(width, height, len(images), f"encoded:{digest}"),), None


async def _empty_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    width, height, batch, color = (_int(inputs[k]) for k in ("width", "height", "batch_size", "color"))
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)

    def work() -> list[Image.Image]:
        return [Image.new("RGB", (width, height), rgb) for _ in range(batch)]

    return (await ctx.cpu(width * height * batch, work),), None


async def _load_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
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


async def _image_scale(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images, width, height = inputs["image"], _int(inputs["width"]), _int(inputs["height"])
    if width == 0 and height == 0:
        return (images,), None
    return (
        await ctx.cpu(
            width * height * len(images),
            lambda: _scaled(images, inputs["upscale_method"], width, height, inputs["crop"]),
        ),
    ), None


async def _image_scale_by(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
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


async def _image_invert(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["image"]
    return (
        await ctx.cpu(sum(i.width * i.height for i in images), lambda: [ImageOps.invert(i) for i in images]),
    ), None


async def _image_blur(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images, sigma = inputs["image"], float(inputs["sigma"])
    return (
        await ctx.cpu(
            sum(i.width * i.height for i in images),
            lambda: [i.filter(ImageFilter.GaussianBlur(sigma)) for i in images],
        ),
    ), None


async def _image_sharpen(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["image"]
    radius, alpha = _int(inputs["sharpen_radius"]), float(inputs["alpha"])
    sharpen = ImageFilter.UnsharpMask(radius=radius, percent=round(100 * alpha), threshold=0)
    return (
        await ctx.cpu(sum(i.width * i.height for i in images), lambda: [i.filter(sharpen) for i in images]),
    ), None


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


async def _save_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    return await _save_images(ctx, inputs["images"], inputs["filename_prefix"], "output")


async def _preview_image(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    suffix = "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return await _save_images(ctx, inputs["images"], "ComfyUI" + suffix, "temp")


async def _save_image_websocket(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    images = inputs["images"]
    for index, image in enumerate(images):
        await ctx.step(index, len(images))
        await ctx.send_image(image, "PNG")
    return (), None


async def _save_latent(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
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


async def _primitive_string(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    return (str(inputs["value"]),), None


async def _save_text(ctx: RunContext, inputs: dict[str, Any]) -> NodeOutput:
    text = str(inputs["text"])
    folder, filename, counter, subfolder = save_path(inputs["filename_prefix"], ctx.output_dir(), 0, 0)
    name = f"{filename}_{counter:05}.{inputs['format']}"
    await ctx.cpu(0, lambda: _write(os.path.join(folder, name), text.encode()))
    saved(folder, filename, counter + 1)
    return (), {"text": [text], "files": [{"filename": name, "subfolder": subfolder, "type": "output"}]}


# --- the catalogue ---------------------------------------------------------------------------------


def _models(folder: str) -> Callable[[Catalogue], list[Any]]:
    return lambda catalogue: [catalogue.model_files(folder)]


def _int_spec(default: int, minimum: int, maximum: int, step: int = 1, **extra: Any) -> list[Any]:
    return ["INT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra}]


def _float_spec(default: float, minimum: float, maximum: float, step: float, **extra: Any) -> list[Any]:
    return ["FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra}]


_IMAGE_IN = {"image": ["IMAGE"]}
_HIDDEN_SAVE = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}

NODES: list[NodeSpec] = [
    NodeSpec("CheckpointLoaderSimple", "Load Checkpoint", "loaders", {"ckpt_name": _models("checkpoints")},
             ("MODEL", "CLIP", "VAE"), _checkpoint_loader,
             description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents."),
    NodeSpec("UNETLoader", "Load Diffusion Model", "advanced/loaders",
             {"unet_name": _models("diffusion_models"), "weight_dtype": [WEIGHT_DTYPES]}, ("MODEL",), _unet_loader),
    NodeSpec("VAELoader", "Load VAE", "loaders", {"vae_name": _models("vae")}, ("VAE",), _vae_loader),
    NodeSpec("CLIPLoader", "Load CLIP", "advanced/loaders",
             {"clip_name": _models("text_encoders"), "type": [CLIP_TYPES]}, ("CLIP",), _clip_loader,
             optional={"device": [["default", "cpu"], {"advanced": True}]}),
    NodeSpec("LoraLoader", "Load LoRA", "loaders",
             {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": _models("loras"),
              "strength_model": _float_spec(1.0, -100.0, 100.0, 0.01),
              "strength_clip": _float_spec(1.0, -100.0, 100.0, 0.01)},
             ("MODEL", "CLIP"), _lora_loader),
    NodeSpec("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
             {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
             ("CONDITIONING",), _clip_text_encode),
    NodeSpec("EmptyLatentImage", "Empty Latent Image", "latent",
             {"width": _int_spec(512, 16, MAX_RESOLUTION, 8), "height": _int_spec(512, 16, MAX_RESOLUTION, 8),
              "batch_size": _int_spec(1, 1, 4096)},
             ("LATENT",), _empty_latent),
    NodeSpec("KSampler", "KSampler", "sampling",
             {"model": ["MODEL"], "seed": _int_spec(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
              "steps": _int_spec(20, 1, 10000), "cfg": _float_spec(8.0, 0.0, 100.0, 0.1, round=0.01),
              "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
              "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
              "denoise": _float_spec(1.0, 0.0, 1.0, 0.01)},
             ("LATENT",), _ksampler),
    NodeSpec("VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ("IMAGE",), _vae_decode),
    NodeSpec("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ("LATENT",), _vae_encode),
    NodeSpec("EmptyImage", "EmptyImage", "image",
             {"width": _int_spec(512, 1, MAX_RESOLUTION), "height": _int_spec(512, 1, MAX_RESOLUTION),
              "batch_size": _int_spec(1, 1, 4096), "color": _int_spec(0, 0, 0xFFFFFF, display="color")},
             ("IMAGE",), _empty_image),
    NodeSpec("LoadImage", "Load Image", "image", {"image": lambda c: [sorted(c.input_files()), {"image_upload": True}]},
             ("IMAGE", "MASK"), _load_image),
    NodeSpec("ImageScale", "Upscale Image", "image/upscaling",
             {**_IMAGE_IN, "upscale_method": [UPSCALE_METHODS], "width": _int_spec(512, 0, MAX_RESOLUTION),
              "height": _int_spec(512, 0, MAX_RESOLUTION), "crop": [["disabled", "center"]]},
             ("IMAGE",), _image_scale),
    NodeSpec("ImageScaleBy", "Upscale Image By", "image/upscaling",
             {**_IMAGE_IN, "upscale_method": [UPSCALE_METHODS], "scale_by": _float_spec(1.0, 0.01, 8.0, 0.01)},
             ("IMAGE",), _image_scale_by),
    NodeSpec("ImageInvert", "Invert Image", "image", dict(_IMAGE_IN), ("IMAGE",), _image_invert),
    NodeSpec("ImageBlur", "Image Blur", "image/postprocessing",
             {**_IMAGE_IN, "blur_radius": _int_spec(1, 1, 31), "sigma": _float_spec(1.0, 0.1, 10.0, 0.1)},
             ("IMAGE",), _image_blur),
    NodeSpec("ImageSharpen", "Image Sharpen", "image/postprocessing",
             {**_IMAGE_IN, "sharpen_radius": _int_spec(1, 1, 31), "sigma": _float_spec(1.0, 0.1, 10.0, 0.01),
              "alpha": _float_spec(1.0, 0.0, 5.0, 0.01)},
             ("IMAGE",), _image_sharpen),
    NodeSpec("SaveImage", "Save Image", "image",
             {"images": ["IMAGE", {"tooltip": "The images to save."}],
              "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}]},
             (), _save_image, hidden=_HIDDEN_SAVE, output_node=True, description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("PreviewImage", "Preview Image", "image", {"images": ["IMAGE"]}, (), _preview_image,
             hidden=_HIDDEN_SAVE, output_node=True, description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("SaveImageWebsocket", "SaveImageWebsocket", "api node/image", {"images": ["IMAGE"]}, (),
             _save_image_websocket, output_node=True),
    NodeSpec("SaveLatent", "SaveLatent", "_for_testing",
             {"samples": ["LATENT"], "filename_prefix": ["STRING", {"default": "latents/ComfyUI"}]},
             (), _save_latent, hidden=_HIDDEN_SAVE, output_node=True),
    NodeSpec("PrimitiveString", "String", "utils/primitive", {"value": ["STRING", {}]}, ("STRING",), _primitive_string),
    NodeSpec("SaveText", "Save Text", "utils",
             {"text": ["STRING", {"forceInput": True}], "filename_prefix": ["STRING", {"default": "text/ComfyUI"}],
              "format": [["txt", "md", "json"]]},
             (), _save_text, output_node=True),
]  # fmt: skip

NODES_BY_NAME: dict[str, NodeSpec] = {spec.name: spec for spec in NODES}


class Catalogue:
    """Builds ``object_info`` from :data:`NODES` and the server's current folders and model lists."""

    def __init__(self, options: EmulatorOptions, input_dir: str) -> None:
        self.options = options
        self.input_dir = input_dir
        self._validation_key: str | None = None
        self._validation_info: dict[str, Any] = {}

    def model_files(self, folder: str) -> list[str]:
        return sorted(self.options.models.get(folder, []))

    def input_files(self) -> list[str]:
        try:
            return [
                name
                for name in os.listdir(self.input_dir)
                if os.path.isfile(os.path.join(self.input_dir, name))
            ]
        except FileNotFoundError:
            return []

    def _resolve(self, spec: Any) -> Any:
        return spec(self) if callable(spec) else spec

    def node_info(self, spec: NodeSpec) -> dict[str, Any]:
        required = {name: self._resolve(value) for name, value in spec.required.items()}
        optional = {name: self._resolve(value) for name, value in spec.optional.items()}
        inputs: dict[str, Any] = {"required": required}
        order: dict[str, list[str]] = {"required": list(required)}
        if optional:
            inputs["optional"] = optional
            order["optional"] = list(optional)
        if spec.hidden:
            inputs["hidden"] = dict(spec.hidden)
            order["hidden"] = list(spec.hidden)
        return {
            "input": inputs,
            "input_order": order,
            "output": list(spec.outputs),
            "output_is_list": [False] * len(spec.outputs),
            "output_name": list(spec.output_names or spec.outputs),
            "name": spec.name,
            "display_name": spec.display_name,
            "description": spec.description,
            "python_module": "nodes",
            "category": spec.category,
            "output_node": spec.output_node,
        }

    def object_info(self) -> dict[str, Any]:
        return {spec.name: self.node_info(spec) for spec in NODES}

    def validation_info(self) -> dict[str, Any]:
        """``object_info`` for validating prompts, rebuilt only when the model lists change. The input-file
        combos in it may be stale, which is harmless: LoadImage validates its file itself."""
        key = json.dumps(self.options.models, sort_keys=True)
        if self._validation_key != key:
            self._validation_info = self.object_info()
            self._validation_key = key
        return self._validation_info
