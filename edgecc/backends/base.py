"""What a backend is to `compile`: four calls in a fixed order, over one staged artifact directory.

1. `check` before the long work: what the build will need (a toolchain, tuning records that
   apply, a way to run the artifact here for verification), failing early and in one line;
2. `build`: the optimized model into the artifact's files; returns the manifest's entries for them;
3. `verify`: the staged artifact, loaded as a user would, against ONNX Runtime;
4. `report`: report.md from the final manifest.

Running an artifact is the runtime's (edgecc.runtime), chosen by its manifest: a device needs no
build code.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, ClassVar

from edgecc.core.optimize import CompileOptions, Optimized
from edgecc.core.target import TargetDesc
from edgecc.runtime.artifact import Artifact

Log = Callable[[str], None]


class Backend(abc.ABC):
    builder: ClassVar[str]  # the distribution that builds the artifact: the manifest records its version

    def __init__(self, target: TargetDesc, options: CompileOptions, log: Log):
        self.target, self.options, self.log = target, options, log

    @abc.abstractmethod
    def check(self) -> None:
        """Up-front checks, run before the model is loaded."""

    @abc.abstractmethod
    def build(self, opt: Optimized, stage_dir: Path) -> dict:
        """Write the artifact's files into `stage_dir`; returns the manifest's `build` entry and any
        section of the backend's own, as top-level manifest entries."""

    @abc.abstractmethod
    def verify(self, artifact: Artifact, opt: Optimized) -> dict:
        """Check the staged artifact against ONNX Runtime; returns the manifest's `verification`
        (or says why it was skipped). Raises VerificationError on disagreement."""

    @abc.abstractmethod
    def report(self, manifest: dict) -> str:
        """report.md for the artifact."""
