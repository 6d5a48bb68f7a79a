"""Where a recorded function lives, and the static checks that decide whether it may be run.

The same source extraction is used when recording (to digest the function) and when replaying (to
compare the digest and to check, before importing anything, that the named function carries the
``repro_track.record`` decorator). A manifest that names anything else is refused unrun.
"""

from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EntryPointRefused

DECORATOR_NAMES = ("record",)


@dataclass(frozen=True)
class FunctionSource:
    """A function's source text as written (decorators included) and whether it is recorded."""

    text: str
    decorated: bool

    @property
    def sha256(self) -> str:
        """Digest of the source text, to tell whether the function changed since recording."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _decorator_is_record(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr in DECORATOR_NAMES
    return isinstance(target, ast.Name) and target.id in DECORATOR_NAMES


def _find(body: list[ast.stmt], parts: list[str]) -> ast.AST | None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == parts[0]:
            if len(parts) == 1:
                return node
            if isinstance(node, ast.ClassDef):
                return _find(node.body, parts[1:])
    return None


def function_source(source: str, qualname: str) -> FunctionSource | None:
    """The source of a module-level function or method named by qualname, or None if absent."""
    if "<locals>" in qualname:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    node = _find(tree.body, qualname.split("."))
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    lines = source.splitlines()
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    text = "\n".join(lines[start:node.end_lineno])
    return FunctionSource(text, any(_decorator_is_record(d) for d in node.decorator_list))


def project_root_for(source_file: Path, cwd: Path | None = None) -> Path:
    """The folder recorded paths are relative to: the git work tree, else cwd, else the file's folder."""
    from .capture.git import repo_root

    root = repo_root(source_file)
    if root is not None:
        return Path(root).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    if source_file.resolve().is_relative_to(cwd):
        return cwd
    return source_file.resolve().parent


def resolve_source(project_dir: Path, relative: str) -> Path:
    """The recorded source file inside project_dir; refuse absolute paths and traversal out of it."""
    if (not relative or not relative.isprintable() or os.path.isabs(relative)
            or relative.startswith(("\\", "/")) or ":" in relative):
        raise EntryPointRefused(f"recorded source path {relative!r} is not a project-relative path")
    root = project_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise EntryPointRefused(
            f"recorded source path {relative!r} points outside the project dir {root}; refusing to run it")
    if path.suffix != ".py":
        raise EntryPointRefused(f"recorded source path {relative!r} is not a Python file")
    if not path.is_file():
        raise EntryPointRefused(
            f"recorded source file {relative!r} does not exist under {root}; pass --project-dir "
            "pointing at the project the run was recorded in")
    return path


def module_matches_path(module: str, relative: str) -> bool:
    """Whether importing ``module`` from the project dir would load the file at ``relative``."""
    parts = Path(relative).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    dotted = module.split(".")
    # src layouts and similar put the package under a folder on sys.path: match the tail.
    return len(dotted) <= len(parts) and list(parts[-len(dotted):]) == dotted


def import_root(project_dir: Path, relative: str, module: str) -> Path:
    """The folder to put on sys.path so that ``import module`` loads ``relative``."""
    parts = Path(relative).with_suffix("").parts
    depth = len(module.split(".")) + (1 if parts[-1] == "__init__" else 0)
    return (project_dir / Path(*parts[: len(parts) - depth])).resolve() if len(parts) > depth \
        else project_dir.resolve()
