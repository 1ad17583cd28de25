# Build: the same command the README and CI use.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
# Not built, but Cargo.toml declares the benches and cargo refuses a manifest whose targets are missing.
COPY benches ./benches
COPY policies ./policies
RUN cargo build --release --locked

# Run: no toolchain, no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/billing-gateway /usr/local/bin/billing-gateway
COPY --from=build /src/policies /etc/billing-gateway/policies
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_POLICY_DIR=/etc/billing-gateway/policies \
    GATEWAY_LOG_FORMAT=json
USER nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/billing-gateway"]
CMD ["serve"]
