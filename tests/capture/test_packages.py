"""Tests for repro_track.capture.packages: versions from metadata, without importing packages."""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import re
import subprocess
import sys

import pytest

from repro_track.capture import packages


@pytest.fixture(autouse=True)
def cold_cache() -> None:
    packages.clear_cache()


class TestPackageVersions:
    """Each requested distribution maps to its installed version or None."""

    def test_torch_matches_its_own_version(self) -> None:
        torch = pytest.importorskip("torch")
        assert packages.package_versions(["torch"]) == {"torch": torch.__version__}

    def test_defaults_cover_every_name(self) -> None:
        versions = packages.package_versions()
        assert list(versions) == list(packages.DEFAULT_PACKAGES)
        for name, version in versions.items():
            expected: str | None
            try:
                expected = metadata.version(name)
            except metadata.PackageNotFoundError:
                expected = None
            assert version == expected, name

    @pytest.mark.parametrize("name", ["definitely-not-installed-pkg-xyz", ""])
    def test_absent_is_none(self, name: str) -> None:
        assert packages.package_versions([name]) == {name: None}

    def test_cached_and_copied(self, monkeypatch: pytest.MonkeyPatch) -> None:
        first = packages.package_versions(("numpy",))
        first["numpy"] = "0.0"
        calls: list[str] = []
        monkeypatch.setattr(packages.metadata, "version", lambda name: calls.append(name) or "9.9")
        assert packages.package_versions(("numpy",)) != {"numpy": "0.0"}
        assert calls == []
        packages.clear_cache()
        assert packages.package_versions(("numpy",)) == {"numpy": "9.9"}


class TestInstalledDistributions:
    """The installed set is a sorted, de-duplicated requirements list with normalised names."""

    def test_lines(self) -> None:
        lines = packages.installed_distributions()
        assert lines, "a virtualenv always has something installed"
        names = [line.split("==", 1)[0] for line in lines]
        assert names == sorted(names)
        assert len(names) == len(set(names))
        for line in lines:
            assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*==\S+", line), line

    def test_contains_known_distribution(self) -> None:
        assert f"pytest=={metadata.version('pytest')}" in packages.installed_distributions()

    def test_requirements_text(self) -> None:
        text = packages.requirements_text()
        assert text.endswith("\n")
        assert text.splitlines() == packages.installed_distributions()

    def test_duplicates_keep_the_first(self, monkeypatch: pytest.MonkeyPatch) -> None:
        class Dist:
            def __init__(self, name: str, version: str) -> None:
                self.metadata = {"Name": name}
                self.version = version

        fakes = [Dist("Foo_Bar", "2.0"), Dist("foo.bar", "1.0"), Dist("Zed", "3"), Dist("", "1")]
        monkeypatch.setattr(packages.metadata, "distributions", lambda: iter(fakes))
        assert packages.installed_distributions() == ["foo-bar==2.0", "zed==3"]

    def test_caller_cannot_mutate_cache(self) -> None:
        packages.installed_distributions().append("evil==1")
        assert "evil==1" not in packages.installed_distributions()


class TestPlatformInfo:
    """Python, OS and libc facts, without host names."""

    def test_shape(self) -> None:
        info = packages.platform_info()
        assert info["python"] == {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "compiler": platform.python_compiler(),
        }
        assert set(info["os"]) == {"system", "release", "version", "machine"}
        assert info["os"]["machine"] == platform.machine()
        assert info["libc"] is None or re.fullmatch(r"\S+ \S+", info["libc"])
        leaves = [info["libc"], *info["python"].values(), *info["os"].values()]
        assert platform.node() not in leaves

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc check")
    def test_glibc(self) -> None:
        name, version = platform.libc_ver()
        if name != "glibc":
            pytest.skip("not a glibc system")
        assert packages.platform_info()["libc"] == f"glibc {version}"


class TestNoHeavyImports:
    """Importing the module and reading versions never imports the packages themselves."""

    def test_subprocess(self) -> None:
        code = (
            "import sys; from repro_track.capture import packages; "
            "packages.package_versions(); packages.installed_distributions(); packages.platform_info(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'mlflow') if m in sys.modules))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60)
        assert result.stdout.strip() == "[]"
