"""Benchmark of digesting and saving outputs against safetensors' own save_file (row 3)."""

from __future__ import annotations

from typing import Any

from bench_common import Config, Row, Workspace, interleaved, median


def _variants(tensor: Any, folder: Any) -> dict[str, Any]:
    """What row 3 times for one tensor: repro-track's one pass, its two steps, safetensors, a raw copy."""
    import numpy as np
    from safetensors.torch import save_file

    from repro_track import outputs

    item = outputs.NamedArray("output", tensor, "tensor")
    return {
        "one-pass": lambda: outputs.save_arrays_described([item], folder / "a.safetensors"),
        "safetensors": lambda: save_file({"output": tensor}, str(folder / "b.safetensors")),
        "copy": lambda: np.copy(tensor.numpy()),
        "describe+save": lambda: _describe_then_save(item, folder / "c.safetensors"),
        "describe": lambda: outputs.describe(item),
    }


def _describe_then_save(item: Any, path: Any) -> None:
    """What a recording does: describe the output for the manifest, then stage it with that digest."""
    from repro_track import outputs

    record = outputs.describe(item)
    outputs.save_arrays([item], path, digests={record["name"]: record["sha256"]})


def row_outputs(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 3: outputs.describe + save_arrays, the two steps a recording takes (describe reads the bytes
    once for digest and statistics, save_arrays once to write them, reusing that digest), vs safetensors' save_file
    alone; the note adds save_arrays_described (all of it in one pass) and a raw copy."""
    import torch

    folder = ws.root / "outputs"
    folder.mkdir()
    rows = []
    for mib, reps in cfg.sizes:
        tensor = torch.rand(mib * 2**20 // 4, generator=torch.Generator().manual_seed(mib))
        times = interleaved(_variants(tensor, folder), reps, warmup=1)
        rate = {name: mib / median(values) for name, values in times.items()}
        for path in folder.iterdir():
            path.unlink()
        del tensor
        ours, theirs = rate["describe+save"], rate["safetensors"]
        rows.append(Row(
            f"3{'abc'[len(rows)]}", f"digest + save {mib} MiB float32", ours, theirs,
            "safetensors save_file", "MiB/s", "-" if mib < 64 else ">= 0.5x",
            None if mib < 64 else ours >= 0.5 * theirs,
            note=f"describe + save_arrays; in one pass (save_arrays_described) {rate['one-pass']:,.0f} MiB/s "
                 f"({rate['one-pass'] / theirs:.2f}x); describe alone "
                 f"{rate['describe']:,.0f} MiB/s; raw copy {rate['copy']:,.0f} MiB/s; median of {reps}",
            details={"seconds": times, "mib_per_s": rate}))
    return rows
