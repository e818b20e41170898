# The kdistill trainer and server: torch, torchao, transformers, fastapi and kdistill, in one
# image with two entrypoints: `train` (worker pods, under torchrun) and `serve` (the
# INT8 student's Deployment).
#
#   docker build -f docker/trainer.Dockerfile -t kdistill/trainer:0.1.0 .
#   docker run kdistill/trainer:0.1.0 train --config job.yaml --output /out
#   docker run -p 8080:8080 kdistill/trainer:0.1.0 serve /model --host 0.0.0.0 --port 8080
#
# torch comes from PyPI, whose Linux wheel is built for CUDA and pulls the CUDA runtime
# libraries (several GB). They cannot be left out: without libcudart and libcublas, even a
# CPU-only `import torch` fails (checked with torch 2.15). Where the PyTorch CPU index is
# reachable, pass --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and
# --build-arg TORCH_SPEC="torch==2.15.*+cpu" for a much smaller, CPU-only image.
ARG BASE_IMAGE=kdistill/python:3.11-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=
ARG TORCH_SPEC=
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
 && if [ -n "${PIP_EXTRA_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL; fi \
 && python3 -m venv /opt/kdistill \
 && python3 requirements-from-pyproject.py src/pyproject.toml trainer,serving > requirements.txt \
 && /opt/kdistill/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile ${TORCH_SPEC:+"${TORCH_SPEC}"} -r requirements.txt
# Bytecode for the dependencies is compiled here, once: pods run with a read-only root
# filesystem and PYTHONDONTWRITEBYTECODE, so without it every start would compile torch and
# transformers from source again (minutes on a busy node). compileall exits 1 on the few
# files that some packages ship as templates rather than Python; those are never imported.
RUN { /opt/kdistill/bin/python -m compileall -q -j 0 /opt/kdistill/lib >/dev/null || true; } \
 && /opt/kdistill/bin/pip uninstall -y pip

# kdistill itself, in its own stage: a source change rebuilds only this small layer, never
# the multi-GB dependency layer above (which nodes would otherwise re-import in full).
FROM build AS app
COPY README.md src/
COPY kdistill/ src/kdistill/
COPY api/ src/api/
COPY operator/ src/operator/
COPY trainer/ src/trainer/
COPY serving/ src/serving/
COPY cli/ src/cli/
# pip was removed from the venv above; ensurepip brings it back in this throw-away stage.
# Everything the install adds (package, dist-info, the `kdistill` script) is newer than the
# stamp and is gathered under /overlay with its full path, for one COPY below.
RUN if [ -f pip-ca.crt ]; then export PIP_CERT=/build/pip-ca.crt; fi \
 && /opt/kdistill/bin/python -m ensurepip >/dev/null \
 && touch /build/stamp && sleep 1 \
 && /opt/kdistill/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check --no-deps --no-compile ./src \
 && /opt/kdistill/bin/python -m pip check \
 && site="$(/opt/kdistill/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && /opt/kdistill/bin/python -m compileall -q "${site}/kdistill" >/dev/null \
 && mkdir /overlay \
 && find /opt/kdistill -newer /build/stamp \( -type f -o -type l \) -not -path '*/pip/*' -not -path '*/pip-*' \
      -not -path '*/__pycache__/pip*' -print0 | tar --null -T - -cf - 2>/dev/null | tar -C /overlay -xf - \
 && test -x /overlay/opt/kdistill/bin/kdistill && test -d "/overlay${site}/kdistill"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="kdistill-trainer" \
      org.opencontainers.image.description="kdistill trainer (kdistill train) and INT8 server (kdistill serve)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A named user for uid 65532: kopf (getpass) and other libraries look the uid up in /etc/passwd.
RUN groupadd --gid 65532 kdistill \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kdistill
COPY --from=build /opt/kdistill /opt/kdistill
COPY --from=app /overlay/ /
COPY docker/entrypoint-trainer.sh /usr/local/bin/kdistill-entrypoint
# Every cache goes under /tmp: pods run with a read-only root filesystem and a writable /tmp.
ENV PATH=/opt/kdistill/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp \
    USER=kdistill \
    HF_HOME=/tmp/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kdistill-entrypoint"]
CMD ["--help"]
