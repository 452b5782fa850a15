"""The emulator's node catalogue: real ComfyUI input names, types, defaults and ranges (see docs/emulator.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comfyfleet.emulators.comfyui.model_folders import FOLDERS, ModelFolders
from comfyfleet.emulators.comfyui.nodes import images, models, outputs
from comfyfleet.emulators.comfyui.nodes.base import NodeSpec
from comfyfleet.emulators.comfyui.nodes.images import UPSCALE_METHODS

if TYPE_CHECKING:
    from comfyfleet.emulators.comfyui.options import EmulatorOptions

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
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image"]  # fmt: skip
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


@dataclass(frozen=True, slots=True)
class ModelList:
    """A loader's combo of the files in one model folder (so the catalogue knows which inputs name models)."""

    folder: str

    def __call__(self, catalogue: Catalogue) -> list[Any]:
        return [catalogue.model_files(self.folder)]


def _int_spec(default: int, minimum: int, maximum: int, step: int = 1, **extra: Any) -> list[Any]:
    return ["INT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra}]


def _float_spec(default: float, minimum: float, maximum: float, step: float, **extra: Any) -> list[Any]:
    return ["FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step, **extra}]


_IMAGE_IN = {"image": ["IMAGE"]}
_HIDDEN_SAVE = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}

NODES: list[NodeSpec] = [
    NodeSpec("CheckpointLoaderSimple", "Load Checkpoint", "loaders", {"ckpt_name": ModelList("checkpoints")},
             ("MODEL", "CLIP", "VAE"), models.checkpoint_loader,
             description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents."),
    NodeSpec("UNETLoader", "Load Diffusion Model", "advanced/loaders",
             {"unet_name": ModelList("diffusion_models"), "weight_dtype": [WEIGHT_DTYPES]}, ("MODEL",), models.unet_loader),
    NodeSpec("VAELoader", "Load VAE", "loaders", {"vae_name": ModelList("vae")}, ("VAE",), models.vae_loader),
    NodeSpec("CLIPLoader", "Load CLIP", "advanced/loaders",
             {"clip_name": ModelList("text_encoders"), "type": [CLIP_TYPES]}, ("CLIP",), models.clip_loader,
             optional={"device": [["default", "cpu"], {"advanced": True}]}),
    NodeSpec("LoraLoader", "Load LoRA", "loaders",
             {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": ModelList("loras"),
              "strength_model": _float_spec(1.0, -100.0, 100.0, 0.01),
              "strength_clip": _float_spec(1.0, -100.0, 100.0, 0.01)},
             ("MODEL", "CLIP"), models.lora_loader),
    NodeSpec("UpscaleModelLoader", "Load Upscale Model", "loaders", {"model_name": ModelList("upscale_models")},
             ("UPSCALE_MODEL",), models.upscale_model_loader),
    NodeSpec("ImageUpscaleWithModel", "Upscale Image (using Model)", "image/upscaling",
             {"upscale_model": ["UPSCALE_MODEL"], **_IMAGE_IN}, ("IMAGE",), images.image_upscale_with_model),
    NodeSpec("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
             {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
             ("CONDITIONING",), models.clip_text_encode),
    NodeSpec("EmptyLatentImage", "Empty Latent Image", "latent",
             {"width": _int_spec(512, 16, MAX_RESOLUTION, 8), "height": _int_spec(512, 16, MAX_RESOLUTION, 8),
              "batch_size": _int_spec(1, 1, 4096)},
             ("LATENT",), models.empty_latent),
    NodeSpec("KSampler", "KSampler", "sampling",
             {"model": ["MODEL"], "seed": _int_spec(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
              "steps": _int_spec(20, 1, 10000), "cfg": _float_spec(8.0, 0.0, 100.0, 0.1, round=0.01),
              "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
              "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
              "denoise": _float_spec(1.0, 0.0, 1.0, 0.01)},
             ("LATENT",), models.ksampler),
    NodeSpec("VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ("IMAGE",), models.vae_decode),
    NodeSpec("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ("LATENT",), models.vae_encode),
    NodeSpec("EmptyImage", "EmptyImage", "image",
             {"width": _int_spec(512, 1, MAX_RESOLUTION), "height": _int_spec(512, 1, MAX_RESOLUTION),
              "batch_size": _int_spec(1, 1, 4096), "color": _int_spec(0, 0, 0xFFFFFF, display="color")},
             ("IMAGE",), images.empty_image),
    NodeSpec("LoadImage", "Load Image", "image", {"image": lambda c: [sorted(c.input_files()), {"image_upload": True}]},
             ("IMAGE", "MASK"), images.load_image),
    NodeSpec("ImageScale", "Upscale Image", "image/upscaling",
             {**_IMAGE_IN, "upscale_method": [UPSCALE_METHODS], "width": _int_spec(512, 0, MAX_RESOLUTION),
              "height": _int_spec(512, 0, MAX_RESOLUTION), "crop": [["disabled", "center"]]},
             ("IMAGE",), images.image_scale),
    NodeSpec("ImageScaleBy", "Upscale Image By", "image/upscaling",
             {**_IMAGE_IN, "upscale_method": [UPSCALE_METHODS], "scale_by": _float_spec(1.0, 0.01, 8.0, 0.01)},
             ("IMAGE",), images.image_scale_by),
    NodeSpec("ImageInvert", "Invert Image", "image", dict(_IMAGE_IN), ("IMAGE",), images.image_invert),
    NodeSpec("ImageBlur", "Image Blur", "image/postprocessing",
             {**_IMAGE_IN, "blur_radius": _int_spec(1, 1, 31), "sigma": _float_spec(1.0, 0.1, 10.0, 0.1)},
             ("IMAGE",), images.image_blur),
    NodeSpec("ImageSharpen", "Image Sharpen", "image/postprocessing",
             {**_IMAGE_IN, "sharpen_radius": _int_spec(1, 1, 31), "sigma": _float_spec(1.0, 0.1, 10.0, 0.01),
              "alpha": _float_spec(1.0, 0.0, 5.0, 0.01)},
             ("IMAGE",), images.image_sharpen),
    NodeSpec("SaveImage", "Save Image", "image",
             {"images": ["IMAGE", {"tooltip": "The images to save."}],
              "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}]},
             (), outputs.save_image, hidden=_HIDDEN_SAVE, output_node=True, description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("PreviewImage", "Preview Image", "image", {"images": ["IMAGE"]}, (), outputs.preview_image,
             hidden=_HIDDEN_SAVE, output_node=True, description="Saves the input images to your ComfyUI output directory."),
    NodeSpec("SaveImageWebsocket", "SaveImageWebsocket", "api node/image", {"images": ["IMAGE"]}, (),
             outputs.save_image_websocket, output_node=True),
    NodeSpec("SaveLatent", "SaveLatent", "_for_testing",
             {"samples": ["LATENT"], "filename_prefix": ["STRING", {"default": "latents/ComfyUI"}]},
             (), outputs.save_latent, hidden=_HIDDEN_SAVE, output_node=True),
    NodeSpec("PrimitiveString", "String", "utils/primitive", {"value": ["STRING", {}]}, ("STRING",), outputs.primitive_string),
    NodeSpec("SaveText", "Save Text", "utils",
             {"text": ["STRING", {"forceInput": True}], "filename_prefix": ["STRING", {"default": "text/ComfyUI"}],
              "format": [["txt", "md", "json"]]},
             (), outputs.save_text, output_node=True),
]  # fmt: skip

NODES_BY_NAME: dict[str, NodeSpec] = {spec.name: spec for spec in NODES}
_LISTED_FOLDERS = sorted(
    {value.folder for spec in NODES for value in (*spec.required.values(), *spec.optional.values())
     if isinstance(value, ModelList)}
)  # fmt: skip


class Catalogue:
    """Builds ``object_info`` from :data:`NODES` and the server's current folders and model lists."""

    def __init__(self, options: EmulatorOptions, input_dir: str) -> None:
        self.options = options
        self.input_dir = input_dir
        self.folders = ModelFolders(options.models_dir, options.extra_model_paths_config)
        self._validation_key: str | None = None
        self._validation_info: dict[str, Any] = {}

    def model_files(self, folder: str) -> list[str]:
        """The names a loader of ``folder`` accepts: the files on disk when model folders are configured
        (re-read when they change), else the configured catalogue."""
        if self.folders.enabled:
            return self.folders.files(folder)
        return sorted(self.options.models.get(folder, []))

    def model_folder_names(self) -> list[str]:
        """What ``GET /models`` lists, and the folders ``GET /models/{folder}`` knows."""
        if self.folders.enabled:
            return self.folders.folder_names()
        return sorted(set(self.options.models) | set(FOLDERS))

    def is_model_input(self, class_type: str, input_name: str) -> bool:
        spec = NODES_BY_NAME.get(class_type)
        return spec is not None and isinstance({**spec.required, **spec.optional}.get(input_name), ModelList)

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
        key = json.dumps([self.model_files(folder) for folder in _LISTED_FOLDERS])
        if self._validation_key != key:
            self._validation_info = self.object_info()
            self._validation_key = key
        return self._validation_info
