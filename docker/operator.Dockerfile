# The kdistill operator: kopf, the Kubernetes client and prometheus-client. No torch.
#
#   docker build -f docker/operator.Dockerfile -t kdistill/operator:0.1.0 .
#   docker build -f docker/operator.Dockerfile --build-arg BASE_IMAGE=python:3.11-slim-bookworm .
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv module. The
# default is the one scripts/build-base-image.sh builds without a registry.
ARG BASE_IMAGE=kdistill/python:3.11-bookworm

FROM ${BASE_IMAGE} AS build
# The sources go to /build/src and commands run in /build: with operator/ in the working
# directory, `python -m ...` would import it instead of the standard library's operator.
WORKDIR /build
# pip-ca.crt is optional: scripts/images.sh adds the host's CA bundle when pip needs one
# (a TLS-inspecting proxy). It stays in this stage and never reaches the final image.
# (pyproject.toml rides along only so that the pattern never matches nothing.)
COPY pyproject.toml pip-ca.cr[t] ./
COPY docker/requirements-from-pyproject.py ./
COPY pyproject.toml src/
# Dependencies first, from pyproject.toml alone: a source change does not reinstall them.
RUN if [ -f pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && python3 -m venv /opt/kdistill \
 && python3 requirements-from-pyproject.py src/pyproject.toml operator > requirements.txt \
 && /opt/kdistill/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile -r requirements.txt
COPY README.md src/
COPY kdistill/ src/kdistill/
COPY api/ src/api/
COPY operator/ src/operator/
COPY trainer/ src/trainer/
COPY serving/ src/serving/
COPY cli/ src/cli/
RUN if [ -f pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && /opt/kdistill/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps ./src \
 && /opt/kdistill/bin/pip check \
 && /opt/kdistill/bin/pip uninstall -y pip \
 && { /opt/kdistill/bin/python -m compileall -q -j 0 /opt/kdistill/lib >/dev/null || true; }
# Bytecode is compiled here, once: pods run with a read-only root filesystem and
# PYTHONDONTWRITEBYTECODE, so without it every start would compile torch and transformers
# from source again (minutes on a busy node). compileall exits 1 on the few files that some
# packages ship as templates rather than Python; those are never imported.

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="kdistill-operator" \
      org.opencontainers.image.description="kdistill operator (kopf): DistillationJob -> worker gang -> INT8 rollout" \
      org.opencontainers.image.licenses="Apache-2.0"
# A named user for uid 65532: kopf (getpass) and other libraries look the uid up in /etc/passwd.
RUN groupadd --gid 65532 kdistill \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kdistill
COPY --from=build /opt/kdistill /opt/kdistill
# HOME on /tmp: the pod's root filesystem is read-only and /tmp is its only writable path.
ENV PATH=/opt/kdistill/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp \
    USER=kdistill \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric non-root user, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["kdistill"]
CMD ["operator"]
