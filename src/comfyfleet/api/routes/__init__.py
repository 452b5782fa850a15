"""Route modules; each exposes ``router``. ``comfyfleet.api.app`` mounts them."""
