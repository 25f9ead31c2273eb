# syntax=docker/dockerfile:1
#
# eventfabric gateway image: a release build on Debian bookworm, run from
# debian:bookworm-slim as a non-root user (uid 10001), listening on 0.0.0.0:5000.
#
#   docker build -t eventfabric .
#   docker run --rm -p 5000:5000 eventfabric                       # single replica
#   docker run --rm -p 5000:5000 -e REDIS_URL=redis://host:6379 eventfabric

# The toolchain CI builds and tests with (the crate itself needs >= 1.88).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build ----------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src

# Dependency layer: the manifests and lock file with placeholder sources, so the
# dependencies are compiled once and reused until Cargo.toml or Cargo.lock change. The
# workspace has two members ("." and "bench"): the bench crate's manifest and a
# placeholder main must be there for the workspace to resolve, but only the gateway
# binary is built, so the load generator's sources are never copied.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked -p eventfabric --bin eventfabric \
 && rm -rf src \
           target/release/eventfabric target/release/eventfabric.d \
           target/release/deps/eventfabric-* target/release/deps/libeventfabric-* \
           target/release/.fingerprint/eventfabric-*

# The real sources (the Redis function library in src/broker/ is compiled in). The
# placeholder's artefacts were removed above, so cargo rebuilds the crate even if the
# copied files look older than them.
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked -p eventfabric --bin eventfabric \
 && cp target/release/eventfabric /usr/local/bin/eventfabric \
 && /usr/local/bin/eventfabric --version

# ---- runtime --------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
RUN groupadd --system --gid 10001 eventfabric \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin eventfabric
COPY --from=build /usr/local/bin/eventfabric /usr/local/bin/eventfabric

USER 10001:10001
# All interfaces inside the container; the default (127.0.0.1:5000) is unreachable from
# outside it. The healthcheck command reads the same variable.
ENV EVENTFABRIC_LISTEN=0.0.0.0:5000
EXPOSE 5000

# The gateway drains on SIGTERM (streams get a spread-out `retry:` hint and close,
# in-flight requests finish) within --drain-secs, 10 s by default: give `docker stop` at
# least that plus a margin (`docker stop -t 15`, compose `stop_grace_period: 15s`).
STOPSIGNAL SIGTERM

# `eventfabric healthcheck` exits 0 when /healthz answers 200 on EVENTFABRIC_ADMIN_LISTEN
# when set, else on EVENTFABRIC_LISTEN: no curl or shell needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --start-interval=1s --retries=3 \
    CMD ["/usr/local/bin/eventfabric", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/eventfabric"]
CMD ["serve"]
