"""fastsam_core: make existing Segment Anything models fast in place.

    import fastsam_core
    fastsam_core.optimize(sam)     # same weights, same outputs within tolerance
    fastsam_core.restore(sam)      # every original module back
"""

from fastsam_core.config import FastConfig
from fastsam_core.patch import is_optimized, optimize, patched, report, restore

__version__ = "0.1.0"

__all__ = ["FastConfig", "optimize", "restore", "is_optimized", "report", "patched"]
