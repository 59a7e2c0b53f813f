# bitsearch service image: the API (`bitsearch serve`), Celery workers (`bitsearch worker`) and beat.
#   docker build -t bitsearch .                                   # CPU torch
#   docker build -t bitsearch-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Build arguments (the defaults are what users get; bench/compose_check.sh overrides them for offline hosts):
#   BASE_IMAGE   the Python 3.11 base image                 (python:3.11-slim)
#   TORCH_INDEX  the package index torch comes from          (PyTorch's CPU index)
#   TORCH_SPEC   what to install as torch: a pinned requirement, or a wheel's URL (torch==2.13.0)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    BITSEARCH_DATA_DIR=/data

# torch first and pinned, from the CPU index by default (a bare "torch" would pull a CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX}" \
 && python -c "import torch; print('torch', torch.__version__)"

WORKDIR /app
# The dependencies in their own layer (empty packages, then uninstalled), so that a change of the code
# rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir -p quant zoo sensitivity search db service \
 && pip install . && pip uninstall -y bitsearch && rm -rf build ./*.egg-info
COPY quant ./quant
COPY zoo ./zoo
COPY sensitivity ./sensitivity
COPY search ./search
COPY db ./db
COPY service ./service
RUN pip install --no-deps . && rm -rf build ./*.egg-info \
 && cd / && python -c "import service.api.app, service.jobs.celery_app, db.repo; import db.session as s; assert (s.MIGRATIONS / 'versions').is_dir()" \
 && rm -rf /tmp/*

RUN useradd --create-home --uid 10001 bitsearch && mkdir -p /data && chown bitsearch /data
USER bitsearch
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"

CMD ["bitsearch", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
