//! A Redis Cluster of the test's own: three primaries and three replicas (`redis-server
//! --cluster-enabled yes` six times on free ports, never 6379, joined by `redis-cli --cluster
//! create`), a short `cluster-node-timeout` so a replica takes over a killed primary within
//! seconds; every node stopped by its PID when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a node may be unreachable before the others fail it over.
const NODE_TIMEOUT_MS: u32 = 1000;

pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: TempDir,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port != 6379 && port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts six nodes, makes them one cluster, and waits until every node says it is ok.
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("a folder for the cluster");
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 6 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let mut cluster = RedisCluster {
            children: Vec::new(),
            ports,
            dir,
        };
        for i in 0..6 {
            let child = cluster.spawn(i);
            cluster.children.push(Some(child));
        }
        let deadline = Instant::now() + super::PATIENCE;
        for i in 0..6 {
            while cluster.cli(i, &["PING"]).trim() != "PONG" {
                assert!(Instant::now() < deadline, "node {i} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli (package redis-tools) runs");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        for i in 0..6 {
            while !cluster
                .cli(i, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(
                    Instant::now() < deadline,
                    "node {i} never saw the cluster ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // A replica takes over only once it has its primary's data.
            while cluster.is_replica(i)
                && !cluster
                    .cli(i, &["INFO", "replication"])
                    .contains("master_link_status:up")
            {
                assert!(Instant::now() < deadline, "replica {i} never synced");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    fn spawn(&self, i: usize) -> Child {
        let port = self.ports[i].to_string();
        let folder = self.dir.path().join(&port);
        std::fs::create_dir_all(&folder).expect("a node's folder");
        Command::new(std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into()))
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // A replica may take over however long its primary has been gone, and syncs at once
            // (not after diskless replication's 5 s wait).
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&folder)
            .arg("--logfile")
            .arg(folder.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts")
    }

    /// `redis-cli -p PORT args…` on node `i`: its output (empty when it does not answer).
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.ports[i].to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of every node's log, for a failure's message.
    pub fn logs(&self) -> String {
        self.ports
            .iter()
            .map(|port| {
                let log = std::fs::read_to_string(
                    self.dir.path().join(port.to_string()).join("redis.log"),
                )
                .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "{port}:\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `redis://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.ports[i])
    }

    /// The node serving `key`'s slot as primary, as node `asked` (alive) sees the cluster; none
    /// while a failed primary is not yet replaced.
    pub fn primary_of(&self, asked: usize, key: &str) -> Option<usize> {
        let slot: u16 = self
            .cli(asked, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot");
        let nodes = self.cli(asked, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
                match (ends.next().flatten(), ends.next().flatten()) {
                    (Some(a), Some(b)) => (a..=b).contains(&slot),
                    (Some(a), None) => a == slot,
                    _ => false,
                }
            });
            if owns {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("a port");
                return self.ports.iter().position(|p| *p == port);
            }
        }
        None
    }

    /// Whether node `i` is a replica.
    pub fn is_replica(&self, i: usize) -> bool {
        self.cli(i, &["ROLE"]).starts_with("slave")
    }

    /// Kills node `i` (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
