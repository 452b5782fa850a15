"""What the tests share: one poll helper (``eventually``), one way to run comfyfleet in the test's own
process (``running_fleet``, or ``FleetThread`` for a synchronous test or a module-wide server), and one way to
run it as a real ``comfyfleet serve`` process (``ServeProcess``, for ``kill -9`` and start-up tests).

A package of the test tree (``tests/`` is on ``sys.path`` through its root ``conftest.py``):
``from support import eventually, running_fleet``.
"""

from support.fleet import TERMINAL, Fleet, FleetThread, emulators, fast_settings, running_fleet
from support.polling import eventually, eventually_blocking
from support.serve import ServeProcess, clean_env
from support.workflows import seed_body, seed_workflow, tiny_workflow

__all__ = [
    "TERMINAL",
    "Fleet",
    "FleetThread",
    "ServeProcess",
    "clean_env",
    "emulators",
    "eventually",
    "eventually_blocking",
    "fast_settings",
    "running_fleet",
    "seed_body",
    "seed_workflow",
    "tiny_workflow",
]
