"""bnadapt: test-time adaptive batch normalization for adversarially trained classifiers.

Pixels live in [0, 1] everywhere; input normalization is a layer inside each model, so noise sigma,
attack eps and certified radii are in pixel units.
"""

from bnadapt.errors import BnadaptError

__version__ = "0.2.0"
__all__ = ["BnadaptError", "__version__"]
