# syntax=docker/dockerfile:1
#
# The spotrun image: the API server and the workers (CMD picks which).
#
#   docker build -t spotrun .                                   # CPU torch (default)
#   docker build -t spotrun-gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Build arguments:
#   TORCH_VERSION    the torch release to install (must satisfy the ml extra in
#                    pyproject.toml).
#   TORCH_INDEX_URL  the wheel index torch comes from. The default CPU index gives a wheel
#                    of ~200 MB; a CUDA index (cu126, cu128, ...) gives one that bundles the
#                    CUDA runtime, so the base image stays python:slim and only the node
#                    needs the NVIDIA driver (GKE installs it on GPU node pools).
#   PYTHON_IMAGE     the base image of both stages.
#   PIP_FIND_LINKS   a folder of wheels pip looks in first, for a build without the
#                    internet (mount it into the build, e.g. `buildah bud -v /opt/wheels:
#                    /opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels`); empty: none.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL  the indexes of spotrun's own dependencies (a local
#                    mirror, `file:///...`, mounted like the wheels); empty: PyPI.
#
# Signals: tini is PID 1 and forwards SIGTERM to spotrun, its only child; spotrun turns the
# notice into a checkpoint and a hand-back. Never wrap the command in `sh -c`: a shell as
# PID 1 does not pass SIGTERM on, and the worker would be SIGKILLed without a word.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/spotrun/bin:$PATH
RUN python -m venv /opt/spotrun
# torch first, from its own index and in its own layer: it is by far the largest download
# and changes far less often than spotrun's code.
RUN pip install --index-url "${TORCH_INDEX_URL}" ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
        "torch==${TORCH_VERSION}"
# Then spotrun's dependencies (those of the ml, s3 and gcs extras), read from pyproject.toml
# alone: a change to spotrun's code rebuilds neither this layer nor torch's, and the final
# stage's copy of the environment stays cached too.
ARG SPOTRUN_EXTRAS=ml,s3,gcs,pubsub
COPY pyproject.toml /src/pyproject.toml
RUN python -c 'import tomllib, os; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; extras = os.environ["SPOTRUN_EXTRAS"].split(","); print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' \
        > /tmp/requirements.txt \
    && pip install ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
        ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} \
        ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} -r /tmp/requirements.txt
# spotrun itself, as a wheel the final stage installs on top.
COPY . /src
RUN pip wheel --no-deps ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
        ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} \
        ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} -w /dist /src

FROM ${PYTHON_IMAGE}
# tini: a PID 1 that forwards signals and reaps zombies (DataLoader workers leave some).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
# A numeric, non-root user, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 spotrun \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/spotrun \
       --no-create-home --shell /usr/sbin/nologin spotrun \
    && mkdir -p /var/lib/spotrun \
    && chown 10001:10001 /var/lib/spotrun
COPY --from=build /opt/spotrun /opt/spotrun
COPY --from=build /dist /tmp/dist
RUN /opt/spotrun/bin/pip install --no-deps --no-cache-dir --disable-pip-version-check \
        /tmp/dist/spotrun-*.whl \
    && rm -rf /tmp/dist \
    && /opt/spotrun/bin/python -c "import spotrun.cli, torch, gcsfs, s3fs"
# SPOTRUN_HOME holds the embedded SQLite database and local checkpoints: writable by the
# user (in Kubernetes an emptyDir is mounted there, the root filesystem stays read-only).
ENV PATH=/opt/spotrun/bin:$PATH \
    SPOTRUN_HOME=/var/lib/spotrun \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/spotrun
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "spotrun"]
CMD ["worker"]
