"""The Markdown card shown as a run's description in the MLflow UI (the ``mlflow.note.content`` tag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rules import risks

MAX_CARD_CHARS = 7500  # MLflow caps tag values at 8000 characters


def _seed_line(m: dict[str, Any]) -> str:
    gens = m["randomness"]["generators"]
    if gens:
        g = gens[0]
        state = "fresh" if g["fresh"] else "already consumed before the call (full state recorded)"
        more = f" (+{len(gens) - 1} more)" if len(gens) > 1 else ""
        return f"{g['initial_seed']} on a **{g['device']}** generator, state {state}{more}"
    seed = m["randomness"]["primary"]["seed"]
    return f"{seed} (argument)" if seed is not None else "no generator or seed argument (global RNG)"


def _hardware(m: dict[str, Any]) -> str:
    cpu = m["cpu"]
    text = (f"CPU {cpu.get('model') or cpu['architecture']}, kernels {cpu.get('torch_capability')}, "
            f"{m['determinism']['num_threads']} threads")
    gpu = m["gpu"]
    if gpu["available"] and gpu["devices"]:
        d = gpu["devices"][0]
        text += f"; GPU {d['name']} ({d.get('sm_count') or '?'} SMs), driver {gpu['driver_version']}"
    else:
        text += "; no GPU"
    return text


def _determinism(m: dict[str, Any]) -> str:
    k = m["determinism"]
    if k["fully_deterministic"]:
        return "on (deterministic algorithms, cuDNN deterministic, TF32 off)"
    off = [name for name, bad in (
        ("deterministic algorithms off", not k["deterministic_algorithms"]),
        ("cudnn.benchmark on", k["cudnn_benchmark"]),
        ("TF32 matmul on", k["matmul_allow_tf32"]),
        ("TF32 cuDNN on", k["cudnn_allow_tf32"]),
    ) if bad]
    used = "GPU used" if k["cuda_used"] else "CPU only, where these switches do not change the bits"
    return f"off ({', '.join(off)}); {used}"


def _outputs(m: dict[str, Any]) -> list[str]:
    return [f"| `{o['name']}` | {_kind(o)} | `{o['sha256'][:16]}` | {o['abs_sum']} |"
            for o in m["outputs"][:20]]


def _kind(o: dict[str, Any]) -> str:
    if o.get("file"):  # a returned file path, recorded by its content
        return f"{o['file']['format']} file `{o['file']['path'][-80:]}`, {o['nbytes']} bytes"
    return f"{o['dtype']} {o['shape']}"


def image_links(run_id: str, paths: list[str], limit: int = 4) -> list[str]:
    """Markdown images served by the MLflow UI's own artifact endpoint (relative to the UI page)."""
    from urllib.parse import quote

    # The files are log_image's own (``images/{key}+step+...png``): the key is the alt text.
    return [f"![{Path(p).stem.split('+step+')[0].replace('~', '/')}]"
            f"(get-artifact?path={quote(p, safe='')}&run_uuid={run_id})" for p in paths[:limit]]


def record_card(m: dict[str, Any], run_id: str, replays: list[str] | None = None,
                images: list[str] | None = None, signature: Any = None) -> str:
    """The card of a recorded run: seed, hardware, determinism, outputs, risks, how to replay.

    ``signature`` is the run's ``signing.SignatureCheck`` as checked where the card is written.
    """
    sw = m["software"]
    lines = [
        f"### repro-track: `{m['call']['qualname']}` ({m['call']['status'].lower()})",
        "",
        *([" ".join(image_links(run_id, images)), ""] if images else []),
        f"- **Seed:** {_seed_line(m)}",
        f"- **Hardware:** {_hardware(m)}",
        f"- **Software:** torch {sw['torch']['version']}, diffusers {sw['packages'].get('diffusers')}, "
        f"CUDA {sw['torch']['cuda'] or '-'}, cuDNN {sw['torch']['cudnn'] or '-'}",
        f"- **Determinism:** {_determinism(m)}",
        f"- **Replay:** `repro-track replay {run_id}`",
    ]
    if signature is not None:
        lines.append(f"- **Signature:** {_signature_line(signature)}")
    if m["call"]["error"]:
        lines.append(f"- **Error:** `{m['call']['error']['type']}: {m['call']['error']['message'][:200]}`")
    if m["outputs"]:
        lines += ["", "| output | dtype shape | sha256 | abs sum |", "|---|---|---|---|", *_outputs(m)]
    found = risks(m)
    if found:
        lines += ["", "**What would stop exact reproduction on another machine**", ""]
        lines += [f"- {r}" for r in found]
    if replays:
        lines += ["", "**Replays of this run**", ""] + [f"- {r}" for r in replays[-20:]]
    return _cap("\n".join(lines))


def _signature_line(check: Any) -> str:
    if not check.signed:
        return "not signed"
    text = f"signed by key `{check.key_id}`"
    if check.verified:
        return text + ", verified against the trusted keys where this card was written"
    return text + ", NOT verified where this card was written (`repro-track show` says why)"


def replay_card(m: dict[str, Any], run_id: str, original_id: str, report: dict[str, Any],
                images: list[str] | None = None) -> str:
    """The card of a replay run: what it replayed, expected vs observed, and the differences."""
    lines = [
        f"### repro-track replay of run `{original_id}`",
        "",
        *([" ".join(image_links(run_id, images)), ""] if images else []),
        f"- **Replayed:** [{original_id}](#/experiments/{report.get('experiment_id', '')}/runs/{original_id})"
        f" (`{m['call']['qualname']}`)",
        f"- **Expected:** {report['expected']} - **Observed:** {report['observed']} - "
        f"**OK:** {'yes' if report['ok'] else 'NO'}",
        f"- **Hardware:** {_hardware(m)}",
        f"- **Replay again:** `repro-track replay {run_id}`",
    ]
    if report["reasons"]:
        lines += ["", "**Reasons**", ""] + [f"- {r}" for r in report["reasons"]]
    if report["outputs"]:
        lines += ["", "| output | bitwise equal | max abs diff | mean abs diff | within tolerance |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{n}` | {o['bitwise_equal']} | {o['max_abs_diff']} | {o['mean_abs_diff']} | "
                  f"{o['within_tolerance']} |" for n, o in list(report["outputs"].items())[:20]]
    return _cap("\n".join(lines))


def _cap(text: str) -> str:
    return text if len(text) <= MAX_CARD_CHARS else text[: MAX_CARD_CHARS - 20] + "\n\n(truncated)"
