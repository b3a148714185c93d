"""What `optimize()` did: which path each stage takes and why (`fastsam_core.report`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageReport:
    """One stage of an optimized model.

    Args:
        stage: dotted name, e.g. "image_encoder" or "image_encoder.attention[global]".
        path: what runs: "fast", "sdpa", "math", "reference", ...
        detail: why, and the settings that matter (dtype, compile state, fallbacks seen).
    """

    stage: str
    path: str
    detail: str = ""


class UnsupportedModule(Exception):
    """Raised by `from_reference` when a module cannot be replaced; the reference stays."""


@dataclass
class Report:
    """The stages of one model, in order. `str(report)` is a table."""

    model: str
    stages: list[StageReport] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("stage", "path", "detail")] + [(s.stage, s.path, s.detail) for s in self.stages]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"fastsam_core report: {self.model}"]
        for stage, path, detail in rows:
            lines.append(f"  {stage:<{widths[0]}}  {path:<{widths[1]}}  {detail}".rstrip())
        return "\n".join(lines)

    def path_of(self, stage: str) -> str:
        """The path taken by `stage` (KeyError if the model has no such stage)."""
        for s in self.stages:
            if s.stage == stage:
                return s.path
        raise KeyError(stage)
