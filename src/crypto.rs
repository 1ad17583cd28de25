//! The process's one TLS crypto provider. A leaf of its own: the TLS listener, the upstream
//! client, the JWKS client and the OTLP exporter all need it installed first, and none of them
//! should have to import the others (or the crate root) for it.

/// Makes ring the one rustls crypto provider of the process, for the TLS listener and every
/// HTTP client (upstream, JWKS) alike. reqwest is built without a provider of its own and
/// panics on building a client before one is installed; every place that builds one calls this
/// first, so a library user (tests included) need not. Calling it again does nothing.
pub fn install_crypto_provider() {
    // Err only when a provider is already installed: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
