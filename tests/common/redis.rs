//! A `redis-server` of the test's own: on a free port (never 6379), no persistence, in a
//! temporary folder, stopped by its PID when dropped; it can be killed and started again on the
//! same port, to test what replicas do while Redis is gone.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The binary, overridable for machines that keep it elsewhere.
fn binary() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A running (or killed) `redis-server`.
pub struct Redis {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    password: Option<String>,
}

impl Redis {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Redis {
        Redis::launch(None)
    }

    /// Starts one that requires `password` (`requirepass`).
    pub fn with_password(password: &str) -> Redis {
        Redis::launch(Some(password.to_owned()))
    }

    fn launch(password: Option<String>) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        assert_ne!(port, 6379, "never the default port");
        let mut redis = Redis {
            port,
            dir: tempfile::tempdir().expect("a folder for redis-server"),
            child: None,
            password,
        };
        redis.restart();
        redis
    }

    /// `redis://127.0.0.1:PORT` (with the password when there is one).
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(binary());
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir"])
            .arg(self.dir.path())
            .args(["--logfile"])
            .arg(self.dir.path().join("redis.log"));
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install redis-server: apt-get install redis-server",
                    binary()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + super::PATIENCE;
        while self.command(&["PING"]).is_none() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} (log: {})",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command through `redis-cli`-free plain RESP over a socket; its reply's first
    /// line, or `None` when the server does not answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        use std::io::{BufRead, BufReader, Write};
        let stream =
            std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), SECOND)
                .ok()?;
        stream.set_read_timeout(Some(SECOND)).ok()?;
        let mut out = Vec::new();
        let mut send = |args: &[&str]| {
            out.extend(format!("*{}\r\n", args.len()).bytes());
            for a in args {
                out.extend(format!("${}\r\n{a}\r\n", a.len()).bytes());
            }
        };
        if let Some(password) = &self.password {
            send(&["AUTH", password]);
        }
        send(args);
        (&stream).write_all(&out).ok()?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if self.password.is_some() {
            reader.read_line(&mut line).ok()?;
            line.clear();
        }
        reader.read_line(&mut line).ok()?;
        if line.starts_with('$') && line.trim() != "$-1" {
            line.clear();
            reader.read_line(&mut line).ok()?;
        }
        (!line.is_empty()).then(|| line.trim_end().to_owned())
    }
}

const SECOND: Duration = Duration::from_secs(1);

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Snapshots, for what replicas do when Redis comes back from an older one.
impl Redis {
    /// The data as it is now (`SAVE`), for [`Redis::restore`]. The dump is taken away, so a
    /// plain [`Redis::restart`] still starts empty.
    pub fn snapshot(&self) -> Vec<u8> {
        assert_eq!(self.command(&["SAVE"]).as_deref(), Some("+OK"), "SAVE");
        let dump = self.dir.path().join("dump.rdb");
        let snapshot = std::fs::read(&dump).expect("the dump SAVE wrote");
        std::fs::remove_file(&dump).expect("dump removed");
        snapshot
    }

    /// Kills the server and starts it again on the same port with the data of `snapshot`
    /// (its dump is loaded at startup), as an operator restoring a backup would.
    pub fn restore(&mut self, snapshot: &[u8]) {
        self.kill();
        let dump = self.dir.path().join("dump.rdb");
        std::fs::write(&dump, snapshot).expect("dump written");
        self.restart();
        std::fs::remove_file(&dump).expect("dump removed");
    }
}

/// Stalls, for what replicas do while Redis answers nothing.
impl Redis {
    /// Freezes the server (SIGSTOP): connections stay open, commands get no answer, as from a
    /// Redis that stalls. [`Redis::resume`] lets it answer them again.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a server [`Redis::pause`] froze (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }
}

/// The key the gateway stores the answer to the canonical request `canonical` under, in the
/// shared tier of organization `ORG` (default prefix), generation `generation`.
pub fn shared_key(kind: &str, generation: u64, canonical: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(canonical.as_bytes());
    let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "billing-gateway:{{{}}}:{kind}:{generation}:{hash}",
        super::ORG
    )
}
