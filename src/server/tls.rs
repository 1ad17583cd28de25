//! The optional TLS listener: rustls with HTTP/2 offered by ALPN, and a certificate that is
//! re-read when its files change (cert-manager and Kubernetes Secret rotations), without a
//! restart and without dropping connections.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The certificate in force, swapped whole when the files change.
struct Reloading(ArcSwap<CertifiedKey>);

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reloading")
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A TLS acceptor whose certificate follows its files.
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Reloading>,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// Reads the PEM certificate chain and private key; errors name the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let current = Arc::new(Reloading(ArcSwap::from_pointee(certified_key(cert, key)?)));
        crate::crypto::install_crypto_provider();
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The handshake half of a connection.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the files every `every`; a broken pair is logged and the last good one stays.
    pub async fn watch(&self, every: Duration) -> std::convert::Infallible {
        let mut seen = fingerprint(&self.cert, &self.key);
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&self.cert, &self.key);
            if now == seen {
                continue;
            }
            match certified_key(&self.cert, &self.key) {
                Ok(key) => {
                    self.current.0.store(Arc::new(key));
                    seen = now;
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                }
                // Cert and key are often written one after the other: try again next poll.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays")
                }
            }
        }
    }
}

fn fingerprint(cert: &Path, key: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((std::fs::read(cert).ok()?, std::fs::read(key).ok()?))
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(certified)
}
