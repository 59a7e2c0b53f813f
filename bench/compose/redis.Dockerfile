# Offline stand-in for redis:7-alpine (Debian bookworm's Redis 7.0), used only by
# bench/compose_check.sh --offline-base. Like the official image: working directory /data, runs as `redis`,
# protected mode off (the container network is the boundary).
ARG DEBIAN_IMAGE=bitsearch-check/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 6379
CMD ["redis-server"]
