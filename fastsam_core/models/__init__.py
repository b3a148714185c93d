"""Fast modules mirroring the reference packages' files and state_dict keys."""

from fastsam_core.models.tiny import tiny

__all__ = ["tiny"]
