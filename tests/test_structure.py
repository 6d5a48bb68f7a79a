"""Structural performance properties: what loads at import, and what capture does once per process.

These check the shape that keeps repro-track cheap, never a duration (timings live in benchmarks/).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from repro_track import capture
from repro_track.capture import gpu

HEAVY = ("torch", "mlflow", "diffusers", "transformers")
MARKER = "HEAVY-MODULES:"


def _python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter; fail with its stderr if it fails."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _heavy_loaded(stdout: str) -> list[str]:
    """The heavy packages the child reported on its MARKER line."""
    line = next(line for line in stdout.splitlines() if line.startswith(MARKER))
    return json.loads(line[len(MARKER):])


_REPORT = f"""
    import json as _json, sys as _sys
    print({MARKER!r} + _json.dumps(sorted({{m.split('.')[0] for m in _sys.modules}} & set({HEAVY!r}))))
"""


class TestImportIsLight:
    """`import repro_track` in a fresh process loads none of torch, mlflow, diffusers or transformers."""

    def test_no_heavy_module_after_import(self) -> None:
        done = _python("import repro_track\n" + textwrap.dedent(_REPORT))
        assert _heavy_loaded(done.stdout) == []


class TestCliHelpIsLight:
    """`repro-track --help` (and a subcommand's --help) loads none of the heavy packages."""

    @pytest.mark.parametrize("argv", [["--help"], ["replay", "--help"], ["show", "--help"]],
                             ids=lambda argv: " ".join(argv))
    def test_no_heavy_module_after_help(self, argv: list[str]) -> None:
        # The console script calls repro_track.cli:run, which calls main; --help exits through SystemExit(0).
        code = f"""
            from repro_track.cli import main
            try:
                main({argv!r})
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        """
        done = _python(textwrap.dedent(code) + textwrap.dedent(_REPORT))
        assert "usage:" in done.stdout
        assert _heavy_loaded(done.stdout) == []


class TestStaticCaptureRunsOnce:
    """Facts that cannot change during a process (installed packages, torch's build) are gathered once."""

    def test_expensive_probes_run_once_over_several_captures(self) -> None:
        code = """
            import importlib.metadata, json
            import torch

            counts = {"distributions": 0, "torch_config": 0}

            def spy(name, fn):
                def wrapper(*args, **kwargs):
                    counts[name] += 1
                    return fn(*args, **kwargs)
                return wrapper

            importlib.metadata.distributions = spy("distributions", importlib.metadata.distributions)
            torch.__config__.show = spy("torch_config", torch.__config__.show)
            from repro_track import capture

            envs = [capture.environment(None, with_git=False) for _ in range(5)]
            assert all(env.requirements == envs[0].requirements for env in envs)
            assert all(env.software == envs[0].software for env in envs)
            print(json.dumps({**counts, "requirements_lines": len(envs[0].requirements.splitlines())}))
        """
        report = json.loads(_python(code).stdout.strip().splitlines()[-1])
        assert report["requirements_lines"] > 0
        assert (report["distributions"], report["torch_config"]) == (1, 1)

    def test_callers_cannot_change_the_cached_facts(self) -> None:
        first = capture.environment(None, with_git=False)
        first.software["packages"]["torch"] = "changed"
        first.cpu["isa_flags"].append("changed")
        second = capture.environment(None, with_git=False)
        assert second.software["packages"]["torch"] != "changed"
        assert "changed" not in second.cpu["isa_flags"]


class _CountingNvml:
    """A stand-in pynvml with one GPU that counts nvmlInit and nvmlShutdown calls."""

    def __init__(self) -> None:
        self.inits = 0
        self.shutdowns = 0

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        handle = object()
        mod.NVML_DEVICE_MIG_ENABLE = 1
        mod.nvmlInit = self._init
        mod.nvmlShutdown = self._shutdown
        mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
        mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
        mod.nvmlDeviceGetCount = lambda: 1
        mod.nvmlDeviceGetHandleByIndex = lambda index: handle
        mod.nvmlDeviceGetName = lambda h: "NVIDIA H200"
        mod.nvmlDeviceGetUUID = lambda h: "GPU-5b5c8a3e-1f0e-4c33-9f5e-6d1b2a7c9e01"
        mod.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
        mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=150_754_820_096)
        mod.nvmlDeviceGetAttributes = lambda h: types.SimpleNamespace(multiprocessorCount=132)
        mod.nvmlDeviceGetMigMode = lambda h: (0, 0)
        return mod

    def _init(self) -> None:
        self.inits += 1

    def _shutdown(self) -> None:
        self.shutdowns += 1


class TestNvmlIdentityCached:
    """The GPU identity is read through NVML once per process, however many calls are captured."""

    @pytest.fixture
    def nvml(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        fake = _CountingNvml()
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())  # NVML cannot exist here: the one stand-in
        gpu.clear_cache()
        yield fake
        gpu.clear_cache()

    def test_one_init_and_shutdown_over_several_captures(self, nvml: _CountingNvml) -> None:
        sections = [capture.environment(None, with_git=False).gpu for _ in range(3)]
        assert (nvml.inits, nvml.shutdowns) == (1, 1)
        assert all(s["available"] and s["devices"][0]["name"] == "NVIDIA H200" for s in sections)


def _package_imports(root: Path, package: str) -> dict[str, set[str]]:
    """For each module of the package: the package modules it imports, at any depth (functions too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        base = parts if is_package else parts[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    stem = base[:len(base) - node.level + 1]
                    module = ".".join(stem + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = targets
    return {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


class TestNoImportCircle:
    """No module of repro_track imports, even inside a function, a module that imports it back."""

    def test_package_has_no_import_circle(self) -> None:
        import repro_track

        graph = _package_imports(Path(repro_track.__file__).parent, "repro_track")
        assert len(graph) > 20
        # A package's __init__ re-exports its submodules: the edge from a submodule up to its own
        # package is how Python loads it, not a dependency, so only edges between siblings count.
        lowered = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
        assert _circles(lowered) == []

    def test_the_checker_finds_a_planted_circle(self) -> None:
        assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
