"""Names, labels and paths of the objects a job owns: one place, so builders, the state machine
and handlers agree on them."""

from __future__ import annotations

from kdistill.api import GROUP
from kdistill.api.metadata import (
    ANNOTATION_MODEL_PATH,
    ANNOTATION_PREVIOUS_MODEL_PATH,
    ANNOTATION_SCHEDULED_TIME,
    ANNOTATION_SOURCE_JOB,
    LABEL_ATTEMPT,
    LABEL_INDEX,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_SCHEDULE,
    LABEL_SERVING,
    MANAGER,
    ROLE_SERVER,
    ROLE_TEACHER,
    ROLE_WORKER,
    STUDENT_INT8_DIR,
)

# The shared labels and annotations (api/metadata.py), for the operator's modules to use as names.*.
__all__ = [
    "ANNOTATION_MODEL_PATH",
    "ANNOTATION_PREVIOUS_MODEL_PATH",
    "ANNOTATION_SCHEDULED_TIME",
    "ANNOTATION_SOURCE_JOB",
    "GROUP",
    "LABEL_ATTEMPT",
    "LABEL_INDEX",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_ROLE",
    "LABEL_SCHEDULE",
    "LABEL_SERVING",
    "MANAGER",
    "ROLE_SERVER",
    "ROLE_TEACHER",
    "ROLE_WORKER",
]

CONFIG_DIR = "/etc/kdistill"
CONFIG_FILE = "job.yaml"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
PVC_ROOT = "/mnt/pvc"
RDZV_PORT = 29500
TRAINER_CONTAINER = "trainer"
# The non-root user every kdistill image declares (docker/*.Dockerfile: `USER 65532:65532`, a
# passwd entry named kdistill, HOME=/tmp). Pods run as this uid; a test keeps the two equal.
RUNTIME_UID = 65532
RUNTIME_USER = "kdistill"
# getpass.getuser() (torch, transformers) reads these before /etc/passwd, so a user's own image
# without a passwd entry for the uid still works; HOME/caches go to the writable /tmp.
RUNTIME_ENV = (
    ("USER", RUNTIME_USER),
    ("LOGNAME", RUNTIME_USER),
    ("HOME", "/tmp"),
    ("XDG_CACHE_HOME", "/tmp/.cache"),
)
SERVER_CONTAINER = "server"
TEACHER_CONTAINER = "teacher"
# The served teacher listens here (in its pods and on its Service).
TEACHER_PORT = 8080
# On the teacher Deployment: a digest of the spec the operator built, so a pass re-applies it only
# when something changed (an operator upgrade), not on every look.
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"


def config_map(job: str) -> str:
    return f"{job}-config"


def workers_service(job: str) -> str:
    return f"{job}-workers"


def workload(job: str) -> str:
    """The job's Kueue Workload (a job labelled kueue.x-k8s.io/queue-name)."""
    return f"{job}-kueue"


def worker_pod(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def trainer_account(job: str) -> str:
    return f"{job}-trainer"


def checkpoint_claim(job: str) -> str:
    return f"{job}-checkpoints"


def serving(job: str, configured: str = "") -> str:
    return configured or f"{job}-serving"


def serving_url(job: str, configured: str, namespace: str, port: int) -> str:
    """The serving Service's in-cluster URL (status.endpoint)."""
    return f"http://{serving(job, configured)}.{namespace}.svc:{port}"


def teacher(job: str) -> str:
    """The served teacher's Deployment and Service (teacher.serve.enabled)."""
    return f"{job}-teacher"


def teacher_url(job: str, namespace: str) -> str:
    """What the workers get in KDISTILL_TEACHER_URL for a served teacher."""
    return f"http://{teacher(job)}.{namespace}.svc:{TEACHER_PORT}"


def teacher_labels(job: str) -> dict[str, str]:
    """The teacher pods' labels: the Deployment's selector and the Service's."""
    return {LABEL_JOB: job, LABEL_ROLE: ROLE_TEACHER}


def master_address(job: str, namespace: str) -> str:
    """worker-0's stable DNS name: its hostname under the headless Service's subdomain."""
    return f"{worker_pod(job, 0)}.{workers_service(job)}.{namespace}.svc"


def output_dir(namespace: str, job: str) -> str:
    return f"{CHECKPOINT_MOUNT}/{namespace}/{job}"


def model_path(namespace: str, job: str) -> str:
    return f"{output_dir(namespace, job)}/{STUDENT_INT8_DIR}"


def worker_selector(job: str) -> str:
    return f"{LABEL_JOB}={job},{LABEL_ROLE}={ROLE_WORKER}"


def teacher_selector(job: str) -> str:
    return f"{LABEL_JOB}={job},{LABEL_ROLE}={ROLE_TEACHER}"


def schedule_selector(schedule: str) -> str:
    """The label selector of a schedule's jobs."""
    return f"{LABEL_SCHEDULE}={schedule}"


def schedule_serving(schedule: str, configured: str = "") -> str:
    """The Deployment and Service that serve a schedule's promoted student."""
    return configured or f"{schedule}-serving"
