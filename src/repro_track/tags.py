"""Every MLflow tag, param and artifact name repro-track writes, in one place.

People filter runs in the MLflow UI on these keys (``tags."repro.gpu" = "NVIDIA H200"``), so they are
part of the public interface: change them only with a schema migration.
"""

from __future__ import annotations

PREFIX = "repro."

# Tags people filter and sort on.
KIND = "repro.kind"  # "record" or "replay"
ENTRY_POINT = "repro.entry_point"
SEED = "repro.seed"
GENERATOR_DEVICE = "repro.generator_device"
GPU = "repro.gpu"
SM_COUNT = "repro.sm_count"
TORCH = "repro.torch"
CUDA = "repro.cuda"
CUDNN = "repro.cudnn"
DIFFUSERS = "repro.diffusers"
CPU_CAPABILITY = "repro.cpu_capability"
THREADS = "repro.threads"
DETERMINISTIC = "repro.deterministic"
MANIFEST_DIGEST = "repro.manifest_digest"
SCHEMA_VERSION = "repro.schema_version"
STATUS = "repro.status"
RISKS = "repro.risks"
SPOOL_ID = "repro.spool_id"
PIPELINE = "repro.pipeline"  # on logged models: digest of the pipeline identity they stand for
SIGNED_BY = "repro.signed_by"  # key id of the recording's signature (claimed; verify to trust)

# Replay tags.
REPLAY_OF = "repro.replay_of"
EXPECTED = "repro.expected"
OBSERVED = "repro.observed"
REPLAYS = "repro.replays"  # on the original: comma-separated ids of its replay runs
REPLAY_LINES = "repro.replay_lines"  # on the original: JSON list of one-line replay summaries

# MLflow's own reserved tags that we fill.
MLFLOW_NOTE = "mlflow.note.content"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_USER = "mlflow.user"
MLFLOW_GIT_BRANCH = "mlflow.source.git.branch"
MLFLOW_GIT_REPO_URL = "mlflow.source.git.repoURL"
MLFLOW_LOGGED_IMAGES = "mlflow.loggedImages"  # the UI lists images/ (image grid, compare view)
MLFLOW_EXPERIMENT_KIND = "mlflow.experimentKind"  # on experiments: which view the MLflow 3 UI opens
EXPERIMENT_KIND_MODEL_DEVELOPMENT = "custom_model_development"

# Artifacts.
ARTIFACT_DIR = "repro"
MANIFEST_FILE = "manifest.json"
OUTPUTS_FILE = "outputs.safetensors"
INPUTS_FILE = "inputs.safetensors"
REQUIREMENTS_FILE = "requirements.txt"
GIT_DIFF_FILE = "git.diff"
SIGNATURE_FILE = "signature.json"
IMAGES_DIR = "images"
MANIFEST_PATH = f"{ARTIFACT_DIR}/{MANIFEST_FILE}"
OUTPUTS_PATH = f"{ARTIFACT_DIR}/{OUTPUTS_FILE}"
INPUTS_PATH = f"{ARTIFACT_DIR}/{INPUTS_FILE}"
SIGNATURE_PATH = f"{ARTIFACT_DIR}/{SIGNATURE_FILE}"

# Params.
PARAM_ARG_PREFIX = "arg."
PARAM_SEED = "seed"
PARAM_GENERATOR_DEVICE = "generator_device"
