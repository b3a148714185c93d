"""Fast modules mirroring the reference packages' files and state_dict keys."""
