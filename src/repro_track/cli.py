"""The ``repro-track`` command: the only code that prints or exits.

Known errors become one line on stderr and exit 2; set REPRO_TRACK_DEBUG=1 for the traceback.
Heavy modules load inside each command, so ``repro-track --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, Sequence

from . import __version__
from .errors import ReproTrackError

EXIT_BAD_INPUT = 2


def _progress(quiet: bool) -> Callable[[str], None]:
    def emit(message: str) -> None:
        if not quiet:
            print(f"repro-track: {message}", file=sys.stderr, flush=True)
    return emit


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- replay

def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    report = replay(args.run, tracking_uri=args.tracking_uri, project_dir=args.project_dir,
                    dry_run=args.dry_run, atol=args.atol, rtol=args.rtol, log=not args.no_log,
                    force=args.force, current_code=args.current_code,
                    apply_recorded_diff=args.apply_recorded_diff, timeout=args.timeout,
                    require_signed=args.require_signed or None, env=args.env,
                    allow_new_packages=args.allow_new_packages, progress=_progress(args.json))
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return report.exit_code
    print(f"run        {report.run_id}")
    print(f"expected   {report.expected}")
    for reason in report.reasons:
        print(f"  - {reason}")
    if report.dry_run:
        print("plan (dry run, nothing was run):")
        for line in report.plan:
            print(f"  {line}")
        return report.exit_code
    if report.observed is None:
        print("observed   not rerun: see the reasons above (--force runs it anyway)")
        return report.exit_code
    verdict = "OK" if report.ok else ("NOTHING COMPARED" if report.observed == "unverified"
                                      else "WORSE THAN EXPECTED")
    print(f"observed   {report.observed}   ({verdict})")
    if report.outputs:
        rows = [[n, c.bitwise_equal, c.max_abs_diff, c.mean_abs_diff, c.within_tolerance]
                for n, c in report.outputs.items()]
        print(_table(["output", "bitwise", "max |diff|", "mean |diff|", "in tolerance"], rows))
    if report.replay_run_id:
        print(f"replay run {report.replay_run_id}")
    return report.exit_code


@contextlib.contextmanager
def _loaded_runs(tracking_uri: str | None, *refs: str) -> Iterator[list[Any]]:
    """Fetch and check runs into one temporary folder, kept while the caller reads their files."""
    import tempfile
    from pathlib import Path

    from . import runs, store

    client = store.client_for(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        yield [runs.load_run(client, ref, Path(tmp) / str(i)) for i, ref in enumerate(refs)]


# ---------------------------------------------------------------- show

def cmd_show(args: argparse.Namespace) -> int:
    from . import tags

    with _loaded_runs(args.tracking_uri, args.run) as (loaded,):
        m = loaded.manifest.to_dict()
    replays = [r for r in loaded.run_tags.get(tags.REPLAYS, "").split(",") if r]
    if args.json:
        print(json.dumps({"run_id": loaded.run_id, "manifest": m, "replays": replays,
                          "signature": loaded.signature.to_dict()}, sort_keys=True))
        return 0
    print(_show_text(loaded.run_id, m, replays, loaded.run_tags))
    print(f"\nsignature\n  {loaded.signature.describe()}")
    return 0


def _show_text(run_id: str, m: dict[str, Any], replays: list[str], run_tags: dict[str, str]) -> str:
    from .rules import risks

    call, sw, cpu, gpu, k = m["call"], m["software"], m["cpu"], m["gpu"], m["determinism"]
    where = call["source_file"] or call["module"]
    out = [f"run {run_id}  ({m['kind']}{', replay of ' + m['replay_of'] if m['replay_of'] else ''})", "",
           "call", f"  {where}:{call['qualname']}  {call['status']}  {call['duration_s']:.3f} s  "
           f"started {call['started_at']}"]
    if call["error"]:
        out.append(f"  error {call['error']['type']}: {call['error']['message'][:200]}")
    out += ["", "arguments"]
    out += [f"  {name:<20} {_arg_text(arg)}" for name, arg in m["arguments"].items()]
    out += ["", "randomness"]
    for g in m["randomness"]["generators"]:
        pos = f"[{g['position']}]" if g["position"] is not None else ""
        out.append(f"  {g['argument']}{pos:<4} {g['device']} generator, seed {g['initial_seed']}, state "
                   f"{g['state_sha256'][:16]} ({'fresh' if g['fresh'] else 'consumed before the call'})")
    used = [n for n, st in m["randomness"]["global"].items()
            if st.get("consumed") or any(d["consumed"] for d in st.get("devices", []))]
    out.append(f"  global RNGs drawn from by the call: {', '.join(used) or 'none'}")
    gpu_text = ", ".join(f"{d['name']} ({d.get('sm_count') or '?'} SMs, cc {d['compute_capability']})"
                         for d in gpu["devices"]) if gpu["available"] else gpu["reason"]
    out += ["", "hardware",
            f"  cpu    {cpu.get('model')} ({cpu['architecture']}), kernels {cpu.get('torch_capability')}, "
            f"{cpu.get('logical_cores')} cores",
            f"  gpu    {gpu_text}" + (f", driver {gpu['driver_version']}" if gpu["available"] else ""),
            "", "software",
            f"  python {sw['python']['version']}, torch {sw['torch']['version']} (CUDA {sw['torch']['cuda']}, "
            f"cuDNN {sw['torch']['cudnn']}), " + ", ".join(f"{n} {v}" for n, v in sw["packages"].items()
                                                            if v and n not in ("torch",)),
            "", "determinism" + (" (fully deterministic)" if k["fully_deterministic"] else "")]
    knobs = [f"{n}={v}" for n, v in sorted(k.items()) if n not in ("sdp", "fully_deterministic")]
    out += [f"  {'  '.join(knobs[i:i + 3])}" for i in range(0, len(knobs), 3)]
    env = m["env_vars"]["captured"]
    out += ["", "environment variables"] + ([f"  {n}={v}" for n, v in env.items()] or ["  (none set)"])
    git = m["git"]
    out += ["", "git", f"  {git.get('commit') or git.get('reason')}"
            + (f" on {git['branch']}" if git.get("branch") else "")
            + (" (uncommitted changes saved as repro/git.diff)" if git.get("dirty") else "")]
    out += ["", "outputs"]
    out += [f"  {o['name']:<12} {o['dtype']:<8} {str(o['shape']):<18} sha256 {o['sha256']}  "
            f"abs_sum {o['abs_sum']}" for o in m["outputs"]] or ["  (none)"]
    out += ["", "risks to exact reproduction elsewhere"] + [f"  - {r}" for r in risks(m)]
    lines = json.loads(run_tags.get("repro.replay_lines", "[]"))
    if replays:
        out += ["", "replays"] + [f"  {_strip_link(line)}" for line in lines]
    return "\n".join(out)


def _arg_text(arg: dict[str, Any]) -> str:
    if arg["kind"] == "json":
        text = json.dumps(arg["value"])
    elif arg["kind"] == "pipeline":
        text = f"{arg['pipeline']['class'].rsplit('.', 1)[-1]} from {arg['pipeline']['name_or_path']}"
    elif arg["kind"] in ("tensor", "ndarray"):
        text = f"{arg['kind']} {arg['dtype']} {arg['shape']} sha256 {arg['sha256'][:16]}"
    else:
        text = arg.get("value") or arg["kind"]
    text = text if len(text) <= 90 else text[:87] + "..."
    return text + ("" if arg["replayable"] else f"  (not replayable: {arg['reason']})")


def _strip_link(line: str) -> str:
    import re

    return re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)


# ---------------------------------------------------------------- diff

def cmd_diff(args: argparse.Namespace) -> int:
    from . import outputs
    from .explain import differences, output_differences

    with _loaded_runs(args.tracking_uri, args.run_a, args.run_b) as (a, b):
        ma, mb = a.manifest.to_dict(), b.manifest.to_dict()
        arrays_a = outputs.load_arrays(a.outputs_path) if a.outputs_path else {}
        arrays_b = outputs.load_arrays(b.outputs_path) if b.outputs_path else {}
        outs = output_differences(ma, mb, arrays_a, arrays_b)
    found = differences(ma, mb)
    if args.json:
        print(json.dumps({"run_a": a.run_id, "run_b": b.run_id,
                          "differences": [d.to_dict() for d in found], "outputs": outs},
                         sort_keys=True, default=str))
        return 0
    print(f"A {a.run_id}\nB {b.run_id}")
    if not found:
        print("the manifests agree on everything that decides the bits")
    for category in ("noise", "input", "arithmetic", "cosmetic"):
        items = [d for d in found if d.category == category]
        if items and (category != "cosmetic" or args.all):
            print(f"\n{_CATEGORY_TITLES[category]}")
            for d in items:
                print(f"  - {d.explanation}")
    hidden = sum(d.category == "cosmetic" for d in found)
    if hidden and not args.all:
        print(f"\n({hidden} cosmetic differences hidden; --all shows them)")
    if outs:
        rows = [[n, o["bitwise_equal"], o["max_abs_diff"], o["mean_abs_diff"]] for n, o in outs.items()]
        print("\n" + _table(["output", "bitwise", "max |diff|", "mean |diff|"], rows))
    return 0


_CATEGORY_TITLES = {
    "noise": "Initial noise differs (the images cannot match):",
    "input": "Different computation (arguments, weights or code):",
    "arithmetic": "Same computation, different rounding:",
    "cosmetic": "No effect on the bits:",
}


# ---------------------------------------------------------------- doctor

def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import checks, fix_lines

    found = checks()
    if args.json:
        print(json.dumps({"checks": [c.to_dict() for c in found], "fix": fix_lines(found)},
                         sort_keys=True))
        return 0
    rows = [["ok" if c.ok else "CHANGE", c.name, c.current, c.wanted, c.cost] for c in found]
    print(_table(["", "knob", "now", "for exact replay", "cost"], rows))
    lines = fix_lines(found)
    if lines:
        print("\nTo record with everything deterministic (or use repro_track.deterministic()):")
        print("\n".join(f"  {line}" for line in lines))
    return 0


# ---------------------------------------------------------------- export

def cmd_export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from . import tags
    from .export import export

    with _loaded_runs(args.tracking_uri, args.run) as (loaded,):
        document = export(loaded.manifest.to_dict(), loaded.run_id, args.format)
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        if not args.output:
            print(text, end="")
            return 0
        target = Path(args.output)
        if args.format != "ro-crate":
            target.write_text(text, "utf-8")
        else:
            # An RO-Crate is a folder: the metadata file plus the data entities it describes.
            (target / tags.ARTIFACT_DIR).mkdir(parents=True, exist_ok=True)
            (target / "ro-crate-metadata.json").write_text(text, "utf-8")
            (target / tags.MANIFEST_PATH).write_text(loaded.manifest.to_json(), "utf-8")
            if loaded.outputs_path:
                shutil.copyfile(loaded.outputs_path, target / tags.OUTPUTS_PATH)
    print(f"wrote {target}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- audit

def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import OUTCOMES, audit

    # Ray's driver prints the cluster's messages (a dead worker) to stdout from a thread of its own;
    # they belong with the progress on stderr, so that --json prints one object.
    with contextlib.redirect_stdout(sys.stderr):
        report = audit(args.experiment, tracking_uri=args.tracking_uri, sample=args.sample,
                       workers=args.workers, project_dir=args.project_dir, seed=args.seed,
                       log=not args.no_log, log_replays=not args.no_log, env=args.env,
                       executor=args.executor, address=args.address, same_gpu=not args.any_gpu,
                       progress=_progress(args.json))
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        rows = [[expected] + [row.get(o, 0) for o in OUTCOMES]
                for expected, row in sorted(report.counts.items())]
        print(_table(["expected \\ observed", *OUTCOMES], rows))
        print(f"\n{len(report.items)} replayed: {report.rate['exact']:.0%} exact, "
              f"{report.rate['ok']:.0%} as good as expected")
        print("\n" + _table(["recorded GPU", "torch", "runs", "exact", "as expected", "error"],
                            [[g["gpu"], g["torch"], g["runs"], g["exact"], g["ok"], g["error"]]
                             for g in report.breakdown]))
        for item in report.items:
            if not item.ok:
                print(f"  {item.run_id}: expected {item.expected}, observed {item.observed}"
                      + (f": {item.error}" if item.error else ""))
        if report.audit_run_id:
            print(f"audit run {report.audit_run_id}")
        if report.log_error:
            print(f"repro-track: the audit run could not be logged: {report.log_error}", file=sys.stderr)
    return 0 if all(item.ok for item in report.items) else 1


# ---------------------------------------------------------------- sync

def cmd_sync(args: argparse.Namespace) -> int:
    from .delivery import sync

    report = sync(args.tracking_uri)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return 0 if not report.failed else 1
    for item in report.uploaded:
        print(f"{item['recording_id']} -> run {item['run_id']}")
    for item in report.failed:
        print(f"repro-track: could not upload {item['recording_id']}: {item['error']}", file=sys.stderr)
    skipped = f", skipped {len(report.skipped)} (another process is uploading them)" if report.skipped else ""
    removed = (f", removed {len(report.removed)} folder(s) that killed processes left in the spool"
               if report.removed else "")
    print(f"uploaded {len(report.uploaded)}, failed {len(report.failed)}{skipped}{removed}", file=sys.stderr)
    return 0 if not report.failed else 1


# ---------------------------------------------------------------- keygen

def cmd_env(args: argparse.Namespace) -> int:
    from . import envbuild, tags

    if args.prune:
        removed, freed = envbuild.prune(args.older_than)
        if args.json:
            print(json.dumps({"removed": [str(p) for p in removed], "bytes_freed": freed}, sort_keys=True))
        else:
            print(f"removed {len(removed)} cached environment(s) from {envbuild.cache_root()}, "
                  f"{freed / 2**20:.1f} MiB freed")
        return 0
    if not args.run:
        raise ReproTrackError("repro-track env: give a RUN, or --prune")
    with _loaded_runs(args.tracking_uri, args.run) as (loaded,):
        import tempfile
        from pathlib import Path

        from . import runs, store

        with tempfile.TemporaryDirectory() as tmp:
            path = runs.fetch_artifact(store.client_for(args.tracking_uri), loaded.run_id,
                                       f"{tags.ARTIFACT_DIR}/{tags.REQUIREMENTS_FILE}", Path(tmp))
            text = envbuild.requirements_with_origins(path.read_text("utf-8") if path else "",
                                                      loaded.manifest.software)
    if args.json:
        print(json.dumps({"run_id": loaded.run_id, "requirements": text}, sort_keys=True))
        return 0
    print(text, end="")
    print("# install with: uv pip install --no-deps -r requirements.txt")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from . import settings, signing

    private, public = signing.keygen(Path(args.out) if args.out else signing.default_key_dir())
    key_id = signing.key_id(signing.load_private_key(private).public_key())
    print(f"repro-track: wrote the private key {private} (keep it to yourself) and the public key "
          f"{public} (key id {key_id}); add the public key to the team's trusted keys file or folder",
          file=sys.stderr)
    print(f"export {settings.SIGNING_KEY.name}={shlex.quote(str(private.resolve()))}")
    print(f"export {settings.TRUSTED_KEYS.name}={shlex.quote(str(public.resolve()))}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="repro-track",
        description="Record, replay and explain diffusion-model generations bit for bit.")
    parser.add_argument("--version", action="version", version=f"repro-track {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="run id, runs:/<id> URI, or run URL from the MLflow UI")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                              "else MLflow's default sqlite:///mlflow.db)")
        p.add_argument("--json", action="store_true", help="print one JSON object for machines")

    p = sub.add_parser("replay", help="rerun a recorded run here and compare its outputs",
                       description="Rebuild a recorded run's environment in a fresh process, rerun "
                       "it and compare outputs. Exit 0 ok, 1 worse than expected or unverified "
                       "(nothing compared, or timed out), 2 bad input or refused, 3 not rerun.")
    run_arg(p)
    common(p)
    p.add_argument("--project-dir", help="folder the run was recorded in (default: current directory)")
    p.add_argument("--dry-run", action="store_true", help="print the prediction and plan; run nothing")
    p.add_argument("--atol", type=float, help="absolute tolerance (default per dtype)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default per dtype)")
    p.add_argument("--no-log", action="store_true", help="do not log the replay as an MLflow run")
    p.add_argument("--force", action="store_true",
                   help="rerun even when the noise cannot be regenerated here, weights differ, or "
                   "the call would overwrite a file it returned by absolute path")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="end the replay's process after this long; the replay is then unverified "
                   "(default: REPRO_TRACK_REPLAY_TIMEOUT, else 3 hours; 0 for no limit)")
    p.add_argument("--current-code", action="store_true",
                   help="run today's project code, not the recorded commit (the change is named)")
    p.add_argument("--apply-recorded-diff", action="store_true",
                   help="apply the run's recorded uncommitted diff (repro/git.diff) to the recorded commit; "
                   "review it with --dry-run first: it comes from the tracking store")
    p.add_argument("--require-signed", action="store_true",
                   help="refuse a run unless a trusted key signed it and every digest matches "
                   "(default: REPRO_TRACK_REQUIRE_SIGNED)")
    p.add_argument("--env", choices=("current", "recorded"), default="current",
                   help="current: this environment's packages (default); recorded: install the recorded "
                   "versions that differ here with uv into a cached environment layered over this one")
    p.add_argument("--allow-new-packages", action="store_true",
                   help="with --env recorded, also install packages not installed here (or from a URL the "
                   "manifest names) for an unsigned run; review them with --dry-run first")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("env", help="print a run's recorded environment as requirements, or prune the cache",
                       description="Print the packages a run was recorded with, as a requirements file with "
                       "their origins and a `uv pip install` line; or remove cached --env recorded "
                       "environments not used for a while.")
    p.add_argument("run", nargs="?", help="run id, runs:/<id> URI, or run URL from the MLflow UI")
    common(p)
    p.add_argument("--prune", action="store_true", help="remove cached environments instead")
    p.add_argument("--older-than", type=float, default=30.0, metavar="DAYS",
                   help="with --prune: unused for this many days (default 30; 0 removes all)")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("show", help="print a recorded run's manifest for people (or --json)")
    run_arg(p)
    common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("diff", help="explain why two runs differ, most decisive cause first")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    common(p)
    p.add_argument("--all", action="store_true", help="also list differences with no effect on the bits")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("doctor", help="judge this environment for reproducibility before recording")
    p.add_argument("--json", action="store_true", help="print one JSON object for machines")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="export a run's provenance as PROV-JSON, RO-Crate or in-toto")
    run_arg(p)
    p.add_argument("--format", required=True, choices=["prov", "ro-crate", "in-toto"])
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                          "else MLflow's default sqlite:///mlflow.db)")
    p.add_argument("-o", "--output", help="write to this file (for ro-crate: a folder holding the crate) "
                                          "instead of stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("audit", help="replay a sample of an experiment's runs and report the rate",
                       description="Replay recorded runs of an experiment in fresh processes and report "
                       "how many come back exact, by expected and observed class. Exit 0 when every "
                       "replay is at least as good as expected, 1 otherwise.")
    p.add_argument("experiment", help="experiment name (or id)")
    common(p)
    p.add_argument("--sample", type=int, help="replay this many runs chosen at random (default: all)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="replays at a time (default: half the cores; each replay uses the recorded "
                   "thread count, and oversubscribed cores make OpenMP crawl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample choice (default: 0)")
    p.add_argument("--project-dir", help="folder the runs were recorded in (default: current directory)")
    p.add_argument("--no-log", action="store_true", help="log neither the replays nor the audit run")
    p.add_argument("--env", choices=("current", "recorded"), default="current",
                   help="replay each run in this environment (default) or its rebuilt recorded one")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run the replays in a local process pool (default) or as tasks on a Ray cluster, "
                   "each on a node with the GPUs and GPU model its recording used (pip install "
                   "'repro-track[ray]')")
    p.add_argument("--address", help="with --executor ray: the cluster to join (e.g. auto, or ray://HOST:10001; "
                   "default: start a local Ray instance of --workers CPUs)")
    p.add_argument("--any-gpu", action="store_true",
                   help="with --executor ray: place GPU replays on any GPU, not only the recorded model "
                   "(such a replay is predicted close at best)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing recordings",
                       description="Write a private key (mode 0600) and its public key, and print the "
                       "two settings to export: recordings are then signed, and runs signed by the "
                       "trusted keys verify.")
    p.add_argument("--out", help="folder for the two key files (default: $XDG_CONFIG_HOME/repro-track)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sync", help="upload recordings waiting in the spool (server down, process "
                       "killed); clear what killed processes left half-done")
    p.add_argument("--tracking-uri", help="upload here instead of where each recording was going")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: uploaded, failed and skipped recordings, removed leftovers")
    p.set_defaults(func=cmd_sync)
    return parser


def _debug() -> bool:
    from . import settings

    try:
        return settings.DEBUG.get()
    except ValueError:  # a mistyped switch: show the traceback, the safer reading for debugging
        return True


def _one_line(text: str) -> str:
    """The message on one line, control characters escaped: messages quote names and values from
    manifests, which must not add lines or drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    # MLflow draws a progress bar per downloaded file; a CLI that fetches two small files is better off
    # without them (only this process's setting; the library never changes it).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        return int(args.func(args))
    except ReproTrackError as exc:
        if _debug():
            raise
        print(f"repro-track: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("repro-track: interrupted", file=sys.stderr)
        return 130


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``repro-track`` program: :func:`main`, then an exit without the interpreter's teardown of the
    libraries a command loaded (see ``repro_track.process``)."""
    from .process import exit_now

    exit_now(main(argv))  # argparse's own exits (--help, a usage error) end the process as usual


if __name__ == "__main__":
    run()
