"""The names the operator, the trainer and the server share outside the CRD's schema.

Labels and annotations on the objects a job owns, the environment the operator gives worker pods,
and the layout of a job's output directory that the server and the operator's rollout read. The
operator writes them; the trainer, the server, tests and tools read them from here.
"""

from __future__ import annotations

from .job import GROUP

# -- labels and annotations on the objects a job owns -------------------------------------------
LABEL_JOB = f"{GROUP}/job"
LABEL_ROLE = f"{GROUP}/role"
LABEL_INDEX = f"{GROUP}/replica-index"
# The gang attempt a worker pod belongs to (0 for the first gang, +1 per gang restart).
LABEL_ATTEMPT = f"{GROUP}/restart-generation"
LABEL_SERVING = f"{GROUP}/serving"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kdistill-operator"

# On the serving Deployment: the artifact it serves, the one it served before, and its job.
ANNOTATION_MODEL_PATH = f"{GROUP}/model-path"
ANNOTATION_PREVIOUS_MODEL_PATH = f"{GROUP}/previous-model-path"
ANNOTATION_SOURCE_JOB = f"{GROUP}/source-job"
# On a schedule's jobs: the schedule that created the job, and the run time it was created for.
LABEL_SCHEDULE = f"{GROUP}/schedule"
ANNOTATION_SCHEDULED_TIME = f"{GROUP}/scheduled-time"

ROLE_WORKER = "worker"
ROLE_SERVER = "server"
# The served teacher's Deployment, its pods and its Service (teacher.serve.enabled).
ROLE_TEACHER = "teacher"

# -- the environment of worker pods ---------------------------------------------------------------
JOB_NAME_ENV = "KDISTILL_JOB_NAME"
JOB_NAMESPACE_ENV = "KDISTILL_JOB_NAMESPACE"
# Where pvc://<claim>/<path> sources resolve: the operator mounts each claim under it.
PVC_ROOT_ENV = "KDISTILL_PVC_ROOT"
# The served teacher's base URL (http://<job>-teacher.<namespace>.svc:<port>, or teacher.endpoint):
# set on the workers whenever the teacher is remote; the trainer reads the teacher from it.
TEACHER_URL_ENV = "KDISTILL_TEACHER_URL"
# The gang attempt the worker belongs to (its pod's LABEL_ATTEMPT, and status.attempt while it is
# current): the trainer fences its checkpoints, status patches and results with it.
ATTEMPT_ENV = "KDISTILL_ATTEMPT"

# -- a job's output directory ---------------------------------------------------------------------
STUDENT_DIR = "student"  # the full-precision student
STUDENT_INT8_DIR = "student-int8"  # what the server loads and the rollout points at, for every quantization mode
ARTIFACT_DIR_NAMES = frozenset({STUDENT_INT8_DIR, STUDENT_DIR})
