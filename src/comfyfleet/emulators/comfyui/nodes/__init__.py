"""The emulator's nodes: the catalogue that ``object_info`` describes and what each node does when run."""

from comfyfleet.emulators.comfyui.nodes.base import Latent, Model, NodeFailed, NodeSpec, RunContext
from comfyfleet.emulators.comfyui.nodes.catalogue import NODES, NODES_BY_NAME, Catalogue

__all__ = ["NODES", "NODES_BY_NAME", "Catalogue", "Latent", "Model", "NodeFailed", "NodeSpec", "RunContext"]
