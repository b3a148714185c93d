"""pytest plugin: record the Triton kernel launches a test run makes, as a GPU run of the same
tests makes them, for `scripts/compile_check.py --launches FILE` to compile for sm_90 with no
GPU here (a failure there is a CUDA test failing on the lent GPU, found before it is lent).

    PYTHONPATH=scripts python -m pytest tests/kernels tests/ops -p record_launches \
        --record-launches /tmp/launches.json
    python scripts/compile_check.py --launches /tmp/launches.json

On the CPU the tests run the kernels in Triton's interpreter with small tiles (the kernel
modules' `INTERPRETER_CONFIG`); with --record-launches those are replaced by the kernels'
GPU defaults before the tests are collected, so each launch is the one the CUDA run makes, and
interpreter-only constexprs are recorded with their GPU value (launch_spec.GPU_CONSTEXPRS).
Identical launches are recorded once, with the first test that made them. Not recorded: the
CUDA-only tests and the candidates the ops' tuners try on a GPU (compile_check's built-in
variants compile those at the encoders' shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-launches", metavar="FILE", type=Path,
                     help="write the kernel launches of this run to FILE (JSON), with the "
                          "GPU's launch configurations (scripts/record_launches.py)")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--record-launches")
    if path is None:
        return
    # imported here, after the root conftest set TRITON_INTERPRET (read when kernels are
    # decorated)
    from fastsam_core.kernels import int8_matmul, rel_pos_attention

    if not rel_pos_attention.INTERPRETER:
        raise pytest.UsageError("--record-launches runs the kernels in Triton's interpreter "
                                "(a machine without CUDA, TRITON_INTERPRET=1)")
    rel_pos_attention.INTERPRETER_CONFIG = rel_pos_attention.LaunchConfig()
    int8_matmul.INTERPRETER_CONFIG = int8_matmul.LaunchConfig()
    config.pluginmanager.register(LaunchRecorder(path), "launch-recorder")


class LaunchRecorder:
    """Wraps `Launch.__call__` for the session; writes the distinct launches at its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.test = "(collection)"
        self.launches: dict[str, dict] = {}  # the specialization as JSON -> record

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from launch_spec import specialization

        from fastsam_core.kernels.launch import Launch

        run = Launch.__call__

        def recorded(launch: Launch) -> None:
            if not hasattr(launch.kernel, "arg_names"):  # a test's stand-in, not a kernel
                return run(launch)
            spec = specialization(launch)
            key = json.dumps(spec, sort_keys=True)
            if key not in self.launches:
                self.launches[key] = dict(name=_name(spec), test=self.test, spec=spec)
            run(launch)

        Launch.__call__ = recorded
        self._restore = lambda: setattr(Launch, "__call__", run)

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.test = item.nodeid

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        import triton

        self._restore()
        self.path.write_text(json.dumps(dict(triton=triton.__version__,
                                             launches=list(self.launches.values())), indent=1))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"recorded {len(self.launches)} distinct kernel launches "
                                    f"in {self.path}")


def _name(spec: dict) -> str:
    """Kernel, the pointers' element types, the constexprs (integers specialized to 1
    included), the options and the runtime arguments not divisible by 16: one line that
    tells the variants apart."""
    pointers = ",".join(kind for kind in spec["types"].values() if kind.startswith("*"))
    constexprs = " ".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    options = " ".join(f"{k}={v}" for k, v in spec["options"].items())
    aligned = {index for index, attrs in spec["attrs"] if attrs}  # index in the arguments
    unaligned = ",".join(name for index, (name, kind) in enumerate(spec["types"].items())
                         if index not in aligned and kind[0] in "*iu")  # pointers, integers
    return f"{spec['kernel'][1]} {pointers} {constexprs} {options}" + (
        f" unaligned={unaligned}" if unaligned else "")
