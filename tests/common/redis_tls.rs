//! A `redis-server` that speaks only TLS (`--port 0 --tls-port P`), with a certificate for
//! 127.0.0.1 signed by a CA the test generates (as a managed Redis with its own CA), on a free
//! port, stopped by its PID when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tempfile::TempDir;

pub struct TlsRedis {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl TlsRedis {
    /// Starts one and waits until it is ready.
    pub fn start() -> TlsRedis {
        let dir = tempfile::tempdir().expect("a folder for redis-server");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Managed Redis test CA");
        let ca_pem = ca.self_signed(&ca_key).expect("CA cert").pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("server cert");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write a TLS file");
        };
        write("ca.pem", &ca_pem);
        write("server.pem", &cert.pem());
        write("server.key", &key.serialize_pem());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        assert_ne!(port, 6379, "never the default port");
        let path = |name: &str| dir.path().join(name);
        let child = Command::new(
            std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned()),
        )
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(path("server.pem"))
        .arg("--tls-key-file")
        .arg(path("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(path("ca.pem"))
        .args(["--tls-auth-clients", "no"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(path("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (with TLS) starts");
        let redis = TlsRedis { port, dir, child };
        let deadline = Instant::now() + super::PATIENCE;
        while !redis.log().contains("Ready to accept connections") {
            assert!(
                Instant::now() < deadline,
                "no TLS redis-server: {}",
                redis.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// The CA's certificate (PEM), to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
