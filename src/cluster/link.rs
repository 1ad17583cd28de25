//! Reaching Redis: a single server or a Redis Cluster, told apart by asking the first node that
//! answers (`HELLO`'s `mode`), so one URL of any node is enough; `rediss://` trusting
//! `GATEWAY_REDIS_CA_FILE`'s certificates when given; and why a command failed, in the words
//! the warning on a switch of mode uses (never the URL, which may hold a password).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, ErrorKind, FromRedisValue, Pipeline,
    ProtocolVersion, RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates, Value,
};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;

/// How long making a connection may take (a TLS handshake included); a request never waits
/// this long, its command is bounded by the timeout.
const CONNECT: Duration = Duration::from_secs(1);

/// A connection to whatever Redis is there: commands and scripts go to the node that owns their
/// keys' slot, and each kind reconnects (and, for a Cluster, follows its topology) by itself.
#[derive(Clone)]
pub(super) enum Conn {
    /// A single server (or a failover address in front of several).
    Single(ConnectionManager),
    /// A Redis Cluster: redirections and a primary's failover are followed.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Subscribes to `channel`; the subscription is made again after a reconnection.
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channel).await,
            Conn::Cluster(c) => c.subscribe(channel).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The two connections of the link: commands, and the pub/sub one whose pushes go to a sender.
pub(super) struct Link {
    pub(super) cmd: Conn,
    pub(super) sub: Conn,
}

/// Where Redis is and how to reach it, checked at start without connecting.
pub(super) struct Target {
    /// Every URL given, RESP3 (pub/sub messages arrive as pushes on a connection that also
    /// takes commands).
    nodes: Vec<ConnectionInfo>,
    certs: Option<TlsCertificates>,
    timeout: Duration,
}

impl Target {
    /// The target of `config` (which has a URL). Its messages name the setting, never the URL.
    pub(super) fn new(config: &RedisConfig) -> Result<Target, String> {
        let urls = config.url.as_ref().ok_or("GATEWAY_REDIS_URL is not set")?;
        // Checked by the configuration already; the client's own message may quote the URL.
        let unusable = |_| "GATEWAY_REDIS_URL: the Redis client cannot use this URL".to_owned();
        let urls = crate::config::parse_redis_urls(urls.expose_secret())
            .map_err(|e| format!("GATEWAY_REDIS_URL: {e}"))?;
        // All of one scheme (checked with the URLs).
        let tls = urls.iter().all(|url| url.scheme() == "rediss");
        let nodes = urls
            .into_iter()
            .map(|url| {
                let info =
                    redis::IntoConnectionInfo::into_connection_info(url).map_err(unusable)?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                Ok(info.set_redis_settings(settings))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let certs = match &config.ca_file {
            Some(path) => {
                if !tls {
                    return Err("GATEWAY_REDIS_CA_FILE is set but GATEWAY_REDIS_URL is not \
                                rediss://: the certificates would not be used"
                        .to_owned());
                }
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(
                        crate::config::pem_certificates(path)
                            .map_err(|e| format!("GATEWAY_REDIS_CA_FILE: {e}"))?,
                    ),
                })
            }
            None => None,
        };
        let target = Target {
            nodes,
            certs,
            timeout: config.timeout,
        };
        // Builds nothing that connects; catches a CA file the client cannot use, at start.
        target.single(0).map_err(unusable)?;
        Ok(target)
    }

    fn single(&self, node: usize) -> RedisResult<Client> {
        let info = self.nodes[node].clone();
        match &self.certs {
            Some(certs) => Client::build_with_tls(info, certs.clone()),
            None => Client::open(info),
        }
    }

    fn cluster(&self, push: Option<impl AsyncPushSender>) -> ClusterClientBuilder {
        let mut builder = ClusterClientBuilder::new(self.nodes.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(CONNECT)
            .response_timeout(self.timeout);
        if let Some(certs) = &self.certs {
            builder = builder.certs(certs.clone());
        }
        if let Some(push) = push {
            builder = builder.push_sender(push);
        }
        builder
    }

    /// Connects: asks the nodes in turn whether they are a Cluster's, and makes the link of
    /// that kind; the error of the last node when none answers.
    pub(super) async fn connect(&self, push: impl AsyncPushSender) -> RedisResult<Link> {
        let mut last = None;
        for node in 0..self.nodes.len() {
            match self.mode(node).await {
                Ok(true) => {
                    let cmd = self.cluster(None::<fn(_) -> Result<(), ()>>).build()?;
                    let sub = self.cluster(Some(push)).build()?;
                    return Ok(Link {
                        cmd: Conn::Cluster(cmd.get_async_connection().await?),
                        sub: Conn::Cluster(sub.get_async_connection().await?),
                    });
                }
                Ok(false) => {
                    let client = self.single(node)?;
                    let reconnect = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT))
                        .set_max_delay(Duration::from_millis(500));
                    // redis-rs waits 500 ms by default: too long for a request to wait.
                    let cmd = reconnect.clone().set_response_timeout(Some(self.timeout));
                    let sub = reconnect
                        .set_response_timeout(Some(Duration::from_secs(1)))
                        .set_push_sender(push)
                        .set_automatic_resubscription();
                    return Ok(Link {
                        cmd: Conn::Single(
                            ConnectionManager::new_with_config(client.clone(), cmd).await?,
                        ),
                        sub: Conn::Single(ConnectionManager::new_lazy_with_config(client, sub)?),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::InvalidClientConfig, "no URL"))))
    }

    /// Whether node `node` is part of a Redis Cluster (`HELLO` says `mode: cluster`).
    async fn mode(&self, node: usize) -> RedisResult<bool> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT))
            .set_response_timeout(Some(CONNECT));
        let mut conn = self
            .single(node)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let hello: HashMap<String, Value> =
            redis::cmd("HELLO").arg(3).query_async(&mut conn).await?;
        let mode = hello.get("mode").map(String::from_redis_value_ref);
        let cluster = matches!(mode, Some(Ok(mode)) if mode == "cluster");
        Ok(cluster)
    }
}

/// Why Redis could not be asked, as the warning on a switch of mode says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens there (connection refused).
    Refused,
    /// No answer within the timeout.
    TimedOut,
    /// The connection dropped.
    Dropped,
    /// The password or the ACL refused it (WRONGPASS, NOAUTH, NOPERM).
    Denied,
    /// A Redis Cluster answered with a redirection or is down (MOVED, ASK, CLUSTERDOWN).
    Cluster,
    /// The TLS handshake failed (an untrusted certificate, a plain server behind `rediss://`).
    Tls,
    /// Any other error.
    Other,
}

impl Cause {
    /// The cause of `error`.
    pub(super) fn of(error: &RedisError) -> Cause {
        let code = error.code().unwrap_or_default();
        if error.is_connection_refusal() {
            Cause::Refused
        } else if error.is_timeout() {
            Cause::TimedOut
        } else if error.kind() == ErrorKind::AuthenticationFailed
            || error.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
            || ["NOPERM", "NOAUTH", "WRONGPASS"].contains(&code)
        {
            Cause::Denied
        } else if error.is_cluster_error() {
            Cause::Cluster
        } else if is_tls(error) {
            Cause::Tls
        } else if error.is_connection_dropped() {
            Cause::Dropped
        } else {
            Cause::Other
        }
    }

    /// What the warning says.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Refused => "connection refused",
            Cause::TimedOut => "timed out",
            Cause::Dropped => "connection lost",
            Cause::Denied => "authentication or ACL refused (WRONGPASS, NOAUTH or NOPERM)",
            Cause::Cluster => "cluster redirection or cluster down (MOVED, ASK, CLUSTERDOWN)",
            Cause::Tls => "TLS handshake failed (is the server's CA in GATEWAY_REDIS_CA_FILE?)",
            Cause::Other => "Redis error",
        }
    }
}

/// Whether `error` comes from TLS: rustls's errors reach here wrapped in an I/O error, whose
/// source chain skips them, so their text is what tells.
fn is_tls(error: &RedisError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "invalidcontenttype",
        "corrupt message",
    ]
    .iter()
    .any(|word| text.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn config(url: &str, ca_file: Option<&str>) -> RedisConfig {
        RedisConfig {
            url: Some(SecretString::from(url.to_owned())),
            prefix: None,
            timeout: Duration::from_millis(100),
            fallback_replicas: 3,
            ca_file: ca_file.map(Into::into),
        }
    }

    #[test]
    fn a_ca_file_that_cannot_be_used_stops_the_start_naming_the_setting_never_the_url() {
        let dir = tempfile::tempdir().expect("tmp");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").expect("write");
        let empty = empty.to_str().expect("a path");
        for (url, ca) in [
            (
                "rediss://:s3cret-password@redis:6379",
                "/nonexistent/ca.pem",
            ),
            ("rediss://:s3cret-password@redis:6379", empty),
            // Certificates for a connection that is not TLS would be ignored: refused.
            ("redis://:s3cret-password@redis:6379", empty),
        ] {
            let Err(e) = Target::new(&config(url, Some(ca))) else {
                panic!("{url} with {ca} accepted");
            };
            assert!(e.starts_with("GATEWAY_REDIS_CA_FILE"), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("redis:6379"), "{e}");
        }
    }

    #[test]
    fn several_urls_are_the_nodes_of_one_cluster_and_must_agree_on_tls() {
        let nodes = Target::new(&config(
            "redis://a:7000, redis://b:7001,redis://c:7002",
            None,
        ));
        assert_eq!(nodes.map(|t| t.nodes.len()).ok(), Some(3));
        let Err(e) = Target::new(&config(
            "redis://:s3cret-password@a:7000,rediss://b:7001",
            None,
        )) else {
            panic!("mixed schemes accepted");
        };
        assert!(
            e.starts_with("GATEWAY_REDIS_URL") && !e.contains("s3cret"),
            "{e}"
        );
    }
}
