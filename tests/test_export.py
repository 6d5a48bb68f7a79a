"""`export`: PROV-JSON, RO-Crate (Process Run Crate) and in-toto/SLSA documents that validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import repro_track
from conftest import run_cli
from repro_track.export import export


@repro_track.record(experiment="export")
def sample(n: int = 4, *, generator=None):
    """A small random tensor."""
    return torch.rand(n, generator=generator)


@pytest.fixture
def run(tracking_uri) -> tuple[str, dict]:
    """One recorded run and its manifest."""
    sample(generator=torch.Generator().manual_seed(3))
    run_id = repro_track.last_recording(sample).wait(120)
    done = run_cli("show", run_id, "--json")
    assert done.returncode == 0, done.stderr
    return run_id, json.loads(done.stdout)["manifest"]


class TestInToto:
    """The in-toto Statement parses strictly into the official protobuf bindings and validates."""

    def test_statement_and_slsa_predicate(self, run):
        from google.protobuf import json_format
        from in_toto_attestation.v1 import statement, statement_pb2
        from in_toto_attestation.predicates.provenance.v1 import provenance_pb2

        run_id, m = run
        doc = export(m, run_id, "in-toto")
        pb = json_format.ParseDict(doc, statement_pb2.Statement())  # unknown fields raise
        statement.Statement.copy_from_pb(pb).validate()
        assert [s.digest["sha256"] for s in pb.subject] == [o["sha256"] for o in m["outputs"]]
        assert pb.predicate_type == "https://slsa.dev/provenance/v1"
        slsa = json_format.ParseDict(doc["predicate"], provenance_pb2.Provenance())
        # SLSA v1 requires buildType, externalParameters and builder.id.
        assert slsa.build_definition.build_type and slsa.run_details.builder.id
        assert slsa.build_definition.external_parameters["arguments"]["n"] == 4
        assert slsa.run_details.metadata.invocation_id == run_id


class TestProv:
    """The PROV-JSON document deserialises with the W3C PROV library into the expected records."""

    def test_prov_json(self, run):
        from prov.model import ProvDocument

        run_id, m = run
        doc = ProvDocument.deserialize(content=json.dumps(export(m, run_id, "prov")), format="json")
        kinds = {type(r).__name__ for r in doc.get_records()}
        assert {"ProvEntity", "ProvActivity", "ProvAgent", "ProvGeneration", "ProvAssociation"} <= kinds
        entities = [r for r in doc.get_records() if type(r).__name__ == "ProvEntity"]
        values = {str(v) for e in entities for _, v in e.attributes}
        assert m["outputs"][0]["sha256"] in values


PROCESS_PROFILE = "https://w3id.org/ro/wfrun/process/0.5"


class TestRoCrate:
    """The crate folder loads with ro-crate-py and meets the Process Run Crate 0.5 requirements."""

    def test_crate_folder(self, run, tmp_path: Path):
        from rocrate.rocrate import ROCrate

        run_id, m = run
        folder = tmp_path / "crate"
        done = run_cli("export", run_id, "--format", "ro-crate", "-o", str(folder))
        assert done.returncode == 0, done.stderr
        crate = ROCrate(str(folder))
        root = crate.root_dataset
        profiles = [p["@id"] if isinstance(p, dict) else p.id for p in _as_list(root["conformsTo"])]
        assert PROCESS_PROFILE in profiles
        actions = [e for e in crate.get_entities() if e.type == "CreateAction"]
        assert len(actions) == 1
        action = actions[0]
        assert action["instrument"].type == "SoftwareApplication"  # REQUIRED by the profile
        results = _as_list(action["result"])
        assert [r.id for r in results] == ["repro/outputs.safetensors"]
        for entity in results + _as_list(action["object"]):
            assert (folder / entity.id).is_file(), f"{entity.id} is not in the crate"
        assert action["endTime"] == m["call"]["ended_at"]
        assert m["outputs"][0]["sha256"] in results[0]["description"]


def _as_list(value):
    return value if isinstance(value, list) else [value]


class TestExportErrors:
    """Bad input gives one line and exit 2."""

    def test_unknown_format_rejected(self, run):
        with pytest.raises(ValueError, match="unknown export format"):
            export(run[1], run[0], "spdx")

    def test_unknown_run(self, tracking_uri):
        done = run_cli("export", "f" * 32, "--format", "prov")
        assert done.returncode == 2 and "no run" in done.stderr.splitlines()[-1]
