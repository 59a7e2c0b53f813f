# Offline stand-in for python:3.11-slim, used only by bench/compose_check.sh --offline-base on hosts that
# cannot pull from a registry. Debian bookworm's python3.11 in a venv on PATH, so `python` and `pip` behave
# as in the official image. Never used by the default build.
ARG DEBIAN_IMAGE=bitsearch-check/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-gdbm ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:$PATH
# Optional extra CA bundle (a TLS-intercepting egress proxy): trusted by the system and by pip.
COPY extra-ca.crt /tmp/extra-ca.crt
RUN if [ -s /tmp/extra-ca.crt ]; then \
      cp /tmp/extra-ca.crt /usr/local/share/ca-certificates/extra-ca.crt && update-ca-certificates >/dev/null \
      && pip config --global set global.cert /etc/ssl/certs/ca-certificates.crt; \
    fi; rm -f /tmp/extra-ca.crt; python --version && pip --version
CMD ["python3"]
