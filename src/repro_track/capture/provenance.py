"""Package provenance that can be rebuilt: where each distribution came from, and the index settings.

``requirements.txt`` says ``name==version``; that is not enough to install the same thing again when a
package came from a git URL, a local folder or an editable checkout. PEP 610's ``direct_url.json``
(written by pip and uv at install time) says so; it is read here through ``importlib.metadata``,
never by importing the package. The pip index settings in effect (index, extra indexes, find-links)
are recorded with credentials stripped, so a replay can rebuild from the same places.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from .git import strip_credentials

@functools.lru_cache(maxsize=1)
def origins() -> dict[str, dict[str, Any]]:
    """For each distribution installed from somewhere other than an index: its PEP 610 origin."""
    from .packages import distributions, normalize_name

    found: dict[str, dict[str, Any]] = {}
    for dist in distributions():
        try:
            name, text = dist.metadata["Name"], dist.read_text("direct_url.json")
        except Exception:  # broken metadata must not break recording
            continue
        if not name or not text or normalize_name(name) in found:
            continue
        origin = _origin(text)
        if origin is not None:
            found[normalize_name(name)] = origin
    return found


def _origin(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    url = strip_credentials(str(data.get("url", "")))
    if "vcs_info" in data:
        vcs = data["vcs_info"]
        return {"kind": "vcs", "url": url, "vcs": vcs.get("vcs"), "commit": vcs.get("commit_id"),
                "requested_revision": vcs.get("requested_revision")}
    if "dir_info" in data:
        return {"kind": "editable" if data["dir_info"].get("editable") else "directory", "url": url}
    if "archive_info" in data:
        hashes = data["archive_info"].get("hashes") or {}
        return {"kind": "archive", "url": url, "sha256": hashes.get("sha256")}
    return None


def interpreter() -> dict[str, str]:
    """The Python that ran: version, implementation, and the platform tag wheels are chosen by."""
    return {"version": ".".join(map(str, sys.version_info[:3])), "implementation": sys.implementation.name,
            "platform": sysconfig.get_platform().replace("-", "_").replace(".", "_")}


def pip_index_settings() -> dict[str, list[str]]:
    """index-url, extra-index-url and find-links in effect for pip (environment over config files)."""
    settings: dict[str, list[str]] = {"index_url": [], "extra_index_url": [], "find_links": []}
    no_index = False
    for path in _pip_config_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                no_index = no_index or parser.get(section, "no-index", fallback="").lower() in ("1", "true", "yes")
                for key in settings:
                    value = parser.get(section, key.replace("_", "-"), fallback="")
                    if value.split():
                        settings[key] = value.split()
    for key in settings:
        value = os.environ.get(f"PIP_{key.upper()}", "")
        if value.split():
            settings[key] = value.split()
    cleaned = {key: [strip_credentials(v) for v in values] for key, values in settings.items()}
    if no_index or os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes", "on"):
        cleaned["no_index"] = ["true"]
    return cleaned


def _pip_config_files() -> list[Path]:
    # pip's order: global (site-wide), user, then the virtual environment's; later ones win.
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs] + [Path("/etc/pip.conf")]
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    files += [Path(os.path.expanduser("~")) / ".pip" / "pip.conf", Path(config_home) / "pip" / "pip.conf"]
    files.append(Path(sys.prefix) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [f for f in files if f.is_file()]


def provenance() -> dict[str, Any]:
    """The software section's ``provenance``: origins, interpreter and index settings."""
    return {"origins": dict(origins()), "interpreter": interpreter(), "index": pip_index_settings()}
