# bitsearch service image: the API (`bitsearch serve`), Celery workers (`bitsearch worker`) and beat.
#   docker build -t bitsearch .                                   # CPU torch
#   docker build -t bitsearch-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    BITSEARCH_DATA_DIR=/data

# torch first and pinned, from the CPU index by default (a bare "torch" would pull a CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY quant ./quant
COPY zoo ./zoo
COPY sensitivity ./sensitivity
COPY search ./search
COPY db ./db
COPY service ./service
RUN pip install . && python -c "import service.api.app, db.repo"

RUN useradd --create-home --uid 10001 bitsearch && mkdir -p /data && chown bitsearch /data
USER bitsearch
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"

CMD ["bitsearch", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
