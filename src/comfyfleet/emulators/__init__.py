"""comfyfleet's stand-ins for the services it drives, for tests, demos and benchmarks: a ComfyUI server
(``comfyui``) and Novita AI's GPU-instance API (``novita``).

Production code never imports this package (an import-linter contract says so); only the CLI starts them.
"""
