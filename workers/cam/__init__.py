"""CAM engine: class activation maps for a batch, on the model's device, in one forward.

See docs/ENGINE.md for the API, the methods' formulas and the conventions.
"""

from workers.cam.engine import CamEngine, CamResult
from workers.cam.errors import CamConfigError
from workers.cam.methods import METHODS

__all__ = ["METHODS", "CamConfigError", "CamEngine", "CamResult"]
