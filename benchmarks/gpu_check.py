"""GPU check: the reproducibility guide's five claims, reproduced, then recorded and replayed.

    python benchmarks/gpu_check.py [--json PATH] [--steps N] [--keep]

With a tiny seeded DDIM pipeline (``repro_track.testing.build_tiny_ddim``) it checks:

1. no generator: two runs differ;
2. CPU generator: the same seed gives the same image every run;
3. CUDA generator: differs from the CPU generator's image with the same seed;
4. CPU generator with the pipeline on CUDA: close to (not necessarily equal to) the CPU run;
5. deterministic settings: L_inf 0 between two runs;

then records each case with ``repro_track.record`` into an MLflow SQLite store and replays it with
``repro_track.replay``, checking that the prediction holds (observed at least as good as expected;
CPU runs on this machine predicted and observed ``exact``). On a GPU it also checks the SM count the
replay reads from the CUDA runtime, measures the grid cap of torch's CUDA sampling from the Philox
offset one element below and above 1024 x cap, and checks the SM-count rule at a smaller GPU's wave.
Without CUDA the CUDA parts are reported as skipped. Exit 0 when every check that ran passed, else 1.
Everything written goes into one temp folder, deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

# cuBLAS reads its workspace setting when CUDA starts: set before anything can start it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ["REPRO_TRACK_DELIVERY"] = "sync"  # a recorded call's run exists when the call returns
os.environ.setdefault("REPRO_TRACK_LOG_TIMEOUT", "300")  # the first call also creates the store

SEED = 1234
CLOSE_ATOL = 5e-2  # "close": the same noise, arithmetic rounded differently (images are in [0, 1])

PROJECT = '''
"""Recorded functions of the GPU check (written by benchmarks/gpu_check.py)."""
import functools

import repro_track


@functools.lru_cache(maxsize=None)
def _pipe(model: str, device: str):
    from repro_track.testing import load_pipeline

    return load_pipeline(model, device=device, progress=False)


def _run(model, device, steps, generator):
    return _pipe(model, device)(batch_size=1, num_inference_steps=steps, generator=generator,
                                output_type="np").images


@repro_track.record(experiment="gpu-check")
def generate(model: str, device: str, steps: int, *, generator=None):
    return _run(model, device, steps, generator)


@repro_track.record(experiment="gpu-check", deterministic=True)
def generate_deterministic(model: str, device: str, steps: int, *, generator=None):
    return _run(model, device, steps, generator)
'''


@dataclass
class Result:
    """One line of the report."""

    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.name}: {self.detail}"


def linf(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    # Named by the process id, not mkdtemp's random letters: the model path is a recorded argument, and
    # a random-looking string there is withheld as a possible credential.
    folder = Path(tempfile.gettempdir()) / f"repro-track-gpu-check-{os.getpid()}"
    folder.mkdir(mode=0o700)
    cwd = os.getcwd()
    try:
        yield folder
    finally:
        os.chdir(cwd)
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


class Check:
    """The tiny pipeline, the recorded functions and the store the checks share."""

    def __init__(self, root: Path, steps: int):
        import torch

        from repro_track.testing import build_tiny_ddim

        self.torch = torch
        self.root = root
        self.steps = steps
        self.cuda = torch.cuda.is_available()
        self.model = str(build_tiny_ddim(root / "tiny-ddim"))
        self.project = root / "project"
        self.project.mkdir()
        (self.project / "gpu_check_gen.py").write_text(textwrap.dedent(PROJECT), "utf-8")
        os.chdir(self.project)  # recorded source paths are relative to the working dir (no git here)
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        os.environ["REPRO_TRACK_SPOOL_DIR"] = str(root / "spool")
        sys.path.insert(0, str(self.project))
        import gpu_check_gen

        self.gen = gpu_check_gen
        self.results: list[Result] = []

    def generator(self, device: str) -> Any:
        return self.torch.Generator(device=device).manual_seed(SEED)

    def plain(self, device: str, gen_device: str | None, deterministic: bool = False) -> Any:
        """One generation with recording switched off (what a user sees without repro-track)."""
        os.environ["REPRO_TRACK_DISABLE"] = "1"
        try:
            fn = self.gen.generate_deterministic if deterministic else self.gen.generate
            gen = self.generator(gen_device) if gen_device else None
            return fn(self.model, device, self.steps, generator=gen)
        finally:
            del os.environ["REPRO_TRACK_DISABLE"]

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.results.append(Result(name, "pass" if ok else "fail", detail))

    def skip(self, name: str, why: str) -> None:
        self.results.append(Result(name, "skip", why))

    # ------------------------------------------------------------ the five claims, measured

    def claims(self) -> None:
        a, b = self.plain("cpu", None), self.plain("cpu", None)
        self.add("1 no generator differs run to run (CPU)", linf(a, b) > 0, f"L_inf {linf(a, b):.3g}")
        a, b = self.plain("cpu", "cpu"), self.plain("cpu", "cpu")
        self.add("2 CPU generator same every run (CPU)", linf(a, b) == 0, f"L_inf {linf(a, b):.3g}")
        a, b = self.plain("cpu", "cpu", True), self.plain("cpu", "cpu", True)
        self.add("5 deterministic settings: L_inf 0 (CPU)", linf(a, b) == 0, f"L_inf {linf(a, b):.3g}")
        if not self.cuda:
            for name in ("3 CUDA generator differs from the CPU one",
                         "4 CPU generator, pipeline on CUDA: close to the CPU run",
                         "1 no generator differs run to run (CUDA)", "5 deterministic settings: L_inf 0 (CUDA)"):
                self.skip(name, "no CUDA device on this machine")
            return
        cpu_run = self.plain("cpu", "cpu")
        cuda_gen = self.plain("cuda", "cuda")
        self.add("3 CUDA generator differs from the CPU one", linf(cpu_run, cuda_gen) > CLOSE_ATOL,
                 f"L_inf {linf(cpu_run, cuda_gen):.3g}")
        mixed = self.plain("cuda", "cpu")
        d = linf(cpu_run, mixed)
        self.add("4 CPU generator, pipeline on CUDA: close to the CPU run", d <= CLOSE_ATOL,
                 f"L_inf {d:.3g} (bit-equal: {d == 0})")
        a, b = self.plain("cuda", None), self.plain("cuda", None)
        self.add("1 no generator differs run to run (CUDA)", linf(a, b) > 0, f"L_inf {linf(a, b):.3g}")
        a, b = self.plain("cuda", "cuda", True), self.plain("cuda", "cuda", True)
        self.add("5 deterministic settings: L_inf 0 (CUDA)", linf(a, b) == 0, f"L_inf {linf(a, b):.3g}")

    # ------------------------------------------------------------ record, replay, compare with the prediction

    def record(self, device: str, gen_device: str | None, deterministic: bool = False) -> str | None:
        """Record one generation in this process; the run id."""
        import repro_track

        fn = self.gen.generate_deterministic if deterministic else self.gen.generate
        gen = self.generator(gen_device) if gen_device else None
        fn(self.model, device, self.steps, generator=gen)
        outcome = repro_track.last_recording(fn)
        return outcome.wait(600) if outcome else None  # uploads run in the background

    def record_fresh_cuda(self) -> str | None:
        """Record in a fresh process where the call itself starts CUDA (torch.manual_seed before it,
        generator=None): the CUDA default generator's seed is only applied when CUDA starts."""
        import subprocess

        code = ("import sys, torch, repro_track; sys.path.insert(0, sys.argv[1]); import gpu_check_gen as g\n"
                f"torch.manual_seed({SEED}); assert not torch.cuda.is_initialized()\n"
                f"g.generate(sys.argv[2], 'cuda', {self.steps})\n"
                "print(repro_track.last_recording(g.generate).wait(600))\n")
        done = subprocess.run([sys.executable, "-c", code, str(self.project), self.model], text=True,
                              capture_output=True, timeout=600, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return None
        return done.stdout.strip().splitlines()[-1]

    def record_and_replay(self, name: str, device: str, gen_device: str | None,
                          deterministic: bool = False, fresh_cuda: bool = False) -> None:
        import repro_track

        run_id = self.record_fresh_cuda() if fresh_cuda else self.record(device, gen_device, deterministic)
        if not run_id or run_id == "None":
            self.add(f"record+replay: {name}", False, "the call was not recorded as a run")
            return
        report = repro_track.replay(run_id, tracking_uri=self.tracking_uri,
                                    project_dir=self.project, log=False)
        diffs = {k: c.max_abs_diff for k, c in report.outputs.items()}
        detail = f"expected {report.expected}, observed {report.observed}, L_inf {diffs}"
        if report.reasons:
            detail += " (" + "; ".join(report.reasons) + ")"
        # The prediction holds when the replay is at least as good as expected; on the recording machine
        # a CPU run must also be predicted exact (GPU runs without determinism are predicted close).
        holds = report.ok and report.observed in ("exact", "close")
        if device == "cpu":
            holds = holds and report.expected == report.observed == "exact"
        self.add(f"record+replay: {name}", holds, detail)

    def replays(self) -> None:
        self.record_and_replay("no generator (CPU)", "cpu", None)
        self.record_and_replay("CPU generator (CPU)", "cpu", "cpu")
        self.record_and_replay("deterministic (CPU)", "cpu", "cpu", deterministic=True)
        if not self.cuda:
            for name in ("no generator, CUDA started inside the call", "CUDA generator",
                         "CPU generator, pipeline on CUDA", "deterministic (CUDA)"):
                self.skip(f"record+replay: {name}", "no CUDA device on this machine")
            return
        self.record_and_replay("no generator, CUDA started inside the call", "cuda", None, fresh_cuda=True)
        self.record_and_replay("CUDA generator", "cuda", "cuda")
        self.record_and_replay("CPU generator, pipeline on CUDA", "cuda", "cpu")
        self.record_and_replay("deterministic (CUDA)", "cuda", "cuda", deterministic=True)

    # ------------------------------------------------------------ the SM-count threshold

    def threshold(self) -> None:
        if not self.cuda:
            self.skip("SM-count threshold (grid cap measured below and above)", "no CUDA device on this machine")
            self.skip("SM count of the replay machine from the CUDA runtime probe", "no CUDA device on this machine")
            self.skip("SM-count rule below and above the threshold", "no CUDA device on this machine")
            return
        torch = self.torch
        props = torch.cuda.get_device_properties(0)
        cap = props.multi_processor_count * (props.max_threads_per_multi_processor // 256)
        # Philox offset per draw: ((n - 1) // (256 * grid * 4) + 1) * 4 with grid = min(ceil(n/256), cap):
        # 4 up to 1024 * cap elements, 8 one element later, only if the grid really is capped at cap.
        steps = {n: self._offset_step(n) for n in (1024 * cap, 1024 * cap + 1)}
        self.add("SM-count threshold (grid cap measured below and above)",
                 steps == {1024 * cap: 4, 1024 * cap + 1: 8},
                 f"{props.name}: {props.multi_processor_count} SMs x {props.max_threads_per_multi_processor} "
                 f"threads, cap {cap} blocks, Philox offset steps {steps}")
        self._rule_at_threshold(props, cap)

    def _offset_step(self, n: int) -> int:
        torch = self.torch
        gen = torch.Generator(device="cuda").manual_seed(SEED)
        before = _philox_offset(gen)
        torch.randn(n, device="cuda", generator=gen)
        return _philox_offset(gen) - before

    def _rule_at_threshold(self, props: Any, cap: int) -> None:
        """The rule against a GPU with fewer SMs: silent for a draw of one wave of that GPU, not above."""
        import copy
        import dataclasses

        from repro_track import runs, store
        from repro_track.replay.plan import describe_here
        from repro_track.rules import predict

        run_id = self.record("cuda", "cuda")
        m = runs.load_run(store.client_for(self.tracking_uri), run_id, self.root / "threshold").manifest.to_dict()
        here = describe_here(None, m)
        smaller = copy.deepcopy(here.gpu)
        order = smaller.get("cuda_order") or [None]
        used = next((d for d in smaller.get("devices", []) if d["index"] == order[0]), None)
        if used is None:
            self.add("SM-count rule below and above the threshold", False,
                     f"the GPU used is not in the GPU section (NVML: {smaller.get('reason') or 'order unknown'})")
            return
        self.add("SM count of the replay machine from the CUDA runtime probe",
                 used.get("sm_count") == props.multi_processor_count,
                 f"{used['name']}: {used.get('sm_count')} SMs in the replay's facts, "
                 f"{props.multi_processor_count} from torch here")
        used.update(name=used["name"] + " (fewer SMs)", sm_count=props.multi_processor_count - 2)
        small_wave = (props.multi_processor_count - 2) * (props.max_threads_per_multi_processor // 256) * 256
        fired = {}
        for numel in (small_wave, small_wave + 1):
            mm = copy.deepcopy(m)
            mm["arguments"]["latents"] = {"kind": "tensor", "replayable": True, "reason": None,
                                          "dtype": "float32", "shape": [numel], "device": "cuda:0",
                                          "parameter": "keyword_only"}
            prediction = predict(mm, dataclasses.replace(here, gpu=smaller))
            fired[numel] = any(r.rule == "cuda_generator_sm_count" for r in prediction.reasons)
        self.add("SM-count rule below and above the threshold", fired == {small_wave: False, small_wave + 1: True},
                 f"against a GPU with {props.multi_processor_count - 2} SMs (one wave: {small_wave} elements), "
                 f"the rule fired {fired}")


def _philox_offset(gen: Any) -> int:
    # A CUDA generator's state is its seed (8 bytes) then its Philox offset (8 bytes, little-endian).
    import struct

    return struct.unpack("<q", gen.get_state().numpy().tobytes()[8:16])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps per generation (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)
    with workspace(args.keep) as root:
        check = Check(root, args.steps)
        cuda = "available" if check.cuda else "not available: CUDA parts skipped"
        print(f"torch {check.torch.__version__}, CUDA {cuda}",
              flush=True)
        for part in (check.claims, check.replays, check.threshold):
            try:
                part()
            except Exception as exc:  # one broken part must not hide the others' results
                import traceback

                traceback.print_exc()
                check.add(f"{part.__name__} ran to the end", False, f"{type(exc).__name__}: {exc}")
    for result in check.results:
        print(result.line())
    failed = [r for r in check.results if r.status == "fail"]
    skipped = [r for r in check.results if r.status == "skip"]
    passed = len(check.results) - len(failed) - len(skipped)
    print(f"{passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    if args.json:
        args.json.write_text(json.dumps({"cuda": check.cuda, "results": [asdict(r) for r in check.results]},
                                        indent=2), "utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
