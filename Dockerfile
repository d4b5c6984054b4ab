# syntax=docker/dockerfile:1.7
# mail-relay container: a release build on Debian 12, run as a non-root user on distroless.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to the relay's own code reuses the cached dependency build.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# The binary embeds config/dev.yml (the default when no settings file is given).
COPY config ./config
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/mail-relay /out/mail-relay

# distroless/cc: glibc, libgcc and CA certificates, no shell; `nonroot` is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mail-relay /usr/local/bin/mail-relay
COPY config /etc/mail-relay
ENV MAIL_RELAY_CONFIG=/etc/mail-relay/osweb-prod.yml \
    MAIL_RELAY_LOG_FORMAT=json \
    SERVER_ADDRESS=0.0.0.0 \
    SERVER_PORT=8080
USER 65532:65532
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/mail-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/mail-relay"]
CMD ["serve"]
