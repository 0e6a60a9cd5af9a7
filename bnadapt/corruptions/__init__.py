"""Common corruptions (Hendrycks & Dietterich 2019; paper Tables 3 and 8): names and parameter tables
(:mod:`.names`), generation with a disk cache (:mod:`.generate`, :mod:`.cache`), the noise family in torch
(:mod:`.torch_noise`), metrics (:mod:`.metrics`), evaluation with and without adaptive BN
(:mod:`.evaluate`) and tables (:mod:`.tables`). Pre-made sets are read by :mod:`bnadapt.data.corrupted`.

The generation library ``imagecorruptions-imaug`` is optional (``pip install 'bnadapt[corruptions]'``);
without it everything but library generation works, and generation says how to install it.
"""

from bnadapt.corruptions.names import (ALL, COMMON, GROUPS, HOLD_OUT, PARAMS, SEVERITIES, TORCH_NOISE,
                                       corruption_seed, parse_corruptions)

__all__ = ["ALL", "COMMON", "GROUPS", "HOLD_OUT", "PARAMS", "SEVERITIES", "TORCH_NOISE", "corruption_seed",
           "parse_corruptions"]
