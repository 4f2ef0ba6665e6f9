//! Command-line and environment configuration, validated once at start.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Args, Parser};

use crate::{local::Limits, ws};

/// The gateway's configuration. Every flag also reads a `CORECAST_*`
/// environment variable; flags win.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "corecast: thread-per-core WebSocket gateway"
)]
pub struct Config {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

/// The node: where it listens, its shards, how it starts and stops.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Node")]
pub struct NodeArgs {
    /// A TOML file whose keys (each flag's name in snake case) set the flags'
    /// defaults; flags and CORECAST_* variables override it. `gateway config
    /// example` prints one.
    #[arg(long, env = "CORECAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    /// Default: 0.0.0.0:8080; with --dev 127.0.0.1:8080, so anonymous chat
    /// and /dev/token are not reachable from other machines by default.
    #[arg(long, env = "CORECAST_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Number of shards (executor threads). Default: the CPUs this process
    /// may run on.
    #[arg(long, env = "CORECAST_SHARDS")]
    pub shards: Option<usize>,

    /// CPUs to pin shards to, e.g. `0-3,6`. Shard i runs on the i-th CPU of
    /// the list. Default: the CPUs this process may run on. When there are
    /// more shards than CPUs the shards are not pinned.
    #[arg(long, env = "CORECAST_CPUS", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,

    /// Listen backlog per shard (capped by net.core.somaxconn). Guards
    /// against refused connections during connect storms.
    #[arg(long, env = "CORECAST_BACKLOG", default_value_t = 4096)]
    pub backlog: u32,

    /// On SIGINT/SIGTERM, how long to wait for clients to finish the close
    /// handshake before exiting, in ms. It also bounds the stop: a shard
    /// still running this long after the close began is left behind and
    /// the process exits 1, naming it.
    #[arg(long, env = "CORECAST_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// On SIGINT/SIGTERM, how long `/readyz` answers 503 `draining` while
    /// the listeners stay open and every client is still served, in ms;
    /// then clients get close 1001 and the listeners close. Gives a load
    /// balancer time to see the failing check and stop sending new
    /// connections (Kubernetes: 5000-15000; HAProxy-style checks: at least
    /// `inter` × `fall`). 0 (the default) closes at once.
    #[arg(long, env = "CORECAST_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// How long the shards have to start (connect their cross-shard rings
    /// and watch their listeners), in ms. A start takes milliseconds; one
    /// that does not finish in time exits 1 naming the shards still
    /// starting, rather than holding the port and answering nobody.
    #[arg(long, env = "CORECAST_START_TIMEOUT_MS", default_value_t = 10_000)]
    pub start_timeout_ms: u64,

    /// Development mode, for trying the gateway on one machine: implies
    /// --allow-anonymous; generates a random HS256 secret at start unless
    /// --jwt-secret is given; serves the demo chat page at / (with /app.js,
    /// /app.css, /corecast.js) and tokens for any user at
    /// /dev/token?user=NAME; adds an ephemeral `typing:` namespace without
    /// presence (unless the file defines one); listens on 127.0.0.1:8080
    /// unless --listen is given. Never in production: anyone who reaches
    /// the port can mint a token for any user.
    #[arg(long, env = "CORECAST_DEV")]
    pub dev: bool,
}

/// TLS: `wss://` on the listener, or on a port of its own.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) for `wss://`. With `--tls-key`
    /// and without `--tls-listen`, `--listen` speaks TLS only.
    #[arg(long, env = "CORECAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of the certificate (PKCS#8, RSA or EC).
    #[arg(long, env = "CORECAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// A second address that speaks TLS, while `--listen` stays plain
    /// (`ws://` and `wss://` from one process). Needs `--tls-cert`.
    #[arg(long, env = "CORECAST_TLS_LISTEN", requires = "tls_cert")]
    pub tls_listen: Option<SocketAddr>,

    /// How often to look whether the certificate or key file changed and
    /// reload them, in seconds (0: only on SIGHUP).
    #[arg(long, env = "CORECAST_TLS_RELOAD_INTERVAL_S", default_value_t = 0)]
    pub tls_reload_interval_s: u64,
}

/// The server API for the application's backend (docs/api.md).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server API")]
pub struct ApiArgs {
    /// Address the HTTP server API listens on, e.g. `127.0.0.1:8081`
    /// (default: no API). Needs --api-key. Keep it off the public network.
    #[arg(long, env = "CORECAST_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,

    /// Keys API calls authenticate with (`Authorization: apikey <key>`),
    /// comma-separated or the flag repeated; several are accepted at once
    /// while rotating. Each at least 16 bytes.
    #[arg(
        long,
        env = "CORECAST_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,

    /// Largest API request body, in bytes; more is answered 413.
    #[arg(long, env = "CORECAST_API_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub api_max_body_bytes: usize,

    /// Longest an API call waits for the homes' answer, in ms; then 503.
    #[arg(long, env = "CORECAST_API_TIMEOUT_MS", default_value_t = 5000)]
    pub api_timeout_ms: u64,

    /// API calls that may wait for answers at once; more are answered 429.
    #[arg(long, env = "CORECAST_API_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub api_max_in_flight: usize,
}

/// Every connection: frame and header limits, timeouts, output budget.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connections")]
pub struct ConnArgs {
    /// Largest frame payload accepted, in bytes; bigger frames close the
    /// connection with 1009. Guards memory: a frame is buffered whole.
    #[arg(long, env = "CORECAST_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    pub max_frame_bytes: usize,

    /// Largest message (all fragments) accepted, in bytes; bigger messages
    /// close the connection with 1009.
    #[arg(long, env = "CORECAST_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,

    /// Largest HTTP request header section, in bytes; more is answered 431.
    #[arg(long, env = "CORECAST_MAX_HEADER_BYTES", default_value_t = 8192)]
    pub max_header_bytes: usize,

    /// Time a new connection has to send its full HTTP request, in ms.
    /// Guards against slowloris-style idle sockets.
    #[arg(long, env = "CORECAST_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,

    /// Close a connection (1001) after this long without any frame from the
    /// client (pongs count), in ms. Frees sockets of vanished clients.
    #[arg(long, env = "CORECAST_IDLE_TIMEOUT_MS", default_value_t = 90_000)]
    pub idle_timeout_ms: u64,

    /// Send a ping after this long without a frame from the client, in ms;
    /// 0 disables. Keeps NAT and proxies from dropping quiet connections.
    #[arg(long, env = "CORECAST_PING_INTERVAL_MS", default_value_t = 30_000)]
    pub ping_interval_ms: u64,

    /// How long to wait for the client's close frame (and for unsent bytes
    /// to drain) after the server sent its own, in ms.
    #[arg(long, env = "CORECAST_CLOSE_TIMEOUT_MS", default_value_t = 3_000)]
    pub close_timeout_ms: u64,

    /// Bytes queued for one client above which the server stops reading
    /// from it (back-pressure). A client that stays above it for
    /// `slow_consumer_timeout_ms` is closed with 1008.
    #[arg(long, env = "CORECAST_OUTBOUND_BUDGET_BYTES", default_value_t = 1 << 20)]
    pub outbound_budget_bytes: usize,

    /// How long a client may stay over its outbound budget, in ms.
    #[arg(
        long,
        env = "CORECAST_SLOW_CONSUMER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub slow_consumer_timeout_ms: u64,

    /// Page origins whose browsers may open WebSockets, comma-separated:
    /// exact (`https://chat.example.com`), a wildcard subdomain
    /// (`https://*.example.com`), or `*`. Another origin gets 403. Unset:
    /// every origin. The defence against cross-site WebSocket hijacking.
    #[arg(long, env = "CORECAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Refuse (403) upgrades that carry no `Origin` header, i.e. clients
    /// other than browsers.
    #[arg(long, env = "CORECAST_REQUIRE_ORIGIN")]
    pub require_origin: bool,
}

/// The chat endpoint (`/ws`): access tokens, per-connection limits.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Chat")]
pub struct ChatArgs {
    /// HS256 secret that access tokens for /ws are signed with (at least 32
    /// bytes). Without it only --allow-anonymous clients get in (--dev
    /// generates one at start).
    #[arg(long, env = "CORECAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with the public key(s) RS256 or ES256 tokens are signed
    /// with (`-----BEGIN PUBLIC KEY-----`, RSA ≥ 2048 bits or EC P-256).
    /// Re-read on SIGHUP.
    #[arg(long, env = "CORECAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// JWKS file (`{"keys":[...]}`) with the issuer's RS256/ES256 signing
    /// keys; a token's `kid` picks its key. Re-read on SIGHUP.
    #[arg(long, env = "CORECAST_JWT_JWKS")]
    pub jwt_jwks: Option<std::path::PathBuf>,

    /// Clock skew forgiven on a token's exp and nbf, in seconds.
    #[arg(long, env = "CORECAST_JWT_LEEWAY_S", default_value_t = 30)]
    pub jwt_leeway_s: u64,

    /// Development only: let /ws clients without a token in as
    /// `anon-<shard>.<n>` (in a cluster `anon-<node-id>.<shard>.<n>`).
    /// --dev implies it.
    #[arg(long, env = "CORECAST_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Most /ws connections one user may hold on this node; the next one is
    /// closed with 4004 right after its welcome. 0: no cap.
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS_PER_USER", default_value_t = 0)]
    pub max_connections_per_user: usize,

    /// Most /ws connections from one client address (IPv4, or IPv6 whole)
    /// on this node; the next one is closed with 4005 right after its
    /// upgrade. 0: no cap. Behind a proxy every client has the proxy's
    /// address: cap in the proxy then.
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Rooms one connection may be in at once. Guards the per-room tables
    /// against one client joining everything.
    #[arg(long, env = "CORECAST_MAX_ROOMS_PER_CONNECTION", default_value_t = 64)]
    pub max_rooms_per_connection: usize,

    /// Client frames per second one /ws connection may send (refill rate).
    #[arg(long, env = "CORECAST_RATE_LIMIT_PER_S", default_value_t = 100.0)]
    pub rate_limit_per_s: f64,

    /// Frames a /ws connection may send at once before the rate applies.
    #[arg(long, env = "CORECAST_RATE_LIMIT_BURST", default_value_t = 200.0)]
    pub rate_limit_burst: f64,

    /// Largest `body` of a publish or direct message, in bytes (a body is
    /// also bounded by --max-message-bytes, as the frame that carries it).
    #[arg(long, env = "CORECAST_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Above this many users a room sends no presence join/leave events and
    /// answers presence queries with the count only.
    #[arg(long, env = "CORECAST_PRESENCE_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_max_members: usize,
}

/// The storage worker: which store, history, presence, spill file.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub struct StorageArgs {
    /// Where room history, sequences and presence are kept: `memory` (this
    /// process only; the default) or `redis` (see --redis). Giving --redis
    /// alone selects `redis`.
    #[arg(long, env = "CORECAST_STORE", value_parser = ["memory", "redis"])]
    pub store: Option<String>,

    /// The Redis server of the `redis` store.
    #[arg(long, env = "CORECAST_REDIS")]
    pub redis: Option<String>,

    /// Messages kept per room for history and resume.
    #[arg(long, env = "CORECAST_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// A room's history is dropped this long after its last message.
    #[arg(long, env = "CORECAST_HISTORY_TTL_S", default_value_t = 86_400)]
    pub history_ttl_s: u64,

    /// A room's sequence and epoch are dropped this long after its last
    /// message (then its seqs start again at 1, in a new epoch). At least
    /// --history-ttl-s.
    #[arg(long, env = "CORECAST_HISTORY_META_TTL_S", default_value_t = 30 * 86_400)]
    pub history_meta_ttl_s: u64,

    /// Most writes the storage worker sends to the store in one batch.
    #[arg(long, env = "CORECAST_STORAGE_BATCH", default_value_t = 512)]
    pub storage_batch: usize,

    /// Most storage operations a shard may have queued; past it publishes
    /// are refused with `storage_busy` (never delivered unstored).
    #[arg(long, env = "CORECAST_STORAGE_QUEUE", default_value_t = 16_384)]
    pub storage_queue: usize,

    /// Where messages Redis could not take wait to be replayed (append-only,
    /// fsynced before the ack).
    #[arg(long, env = "CORECAST_SPILL_DIR", default_value = "corecast-spill")]
    pub spill_dir: std::path::PathBuf,

    /// Redis connect, read and write timeout; a slower answer opens the
    /// breaker and spills.
    #[arg(long, env = "CORECAST_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// This node's name: in presence entries and the spill file's name.
    /// (Default node-1; required with --mesh-bind, unique per node.)
    #[arg(long, env = "CORECAST_NODE_ID")]
    pub node_id: Option<String>,

    /// A presence entry in the store expires this long after the home's last
    /// heartbeat (heartbeats run three times per TTL).
    #[arg(long, env = "CORECAST_PRESENCE_TTL_S", default_value_t = 30)]
    pub presence_ttl_s: u64,
}

/// The node mesh, when the node runs in a cluster.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cluster")]
pub struct MeshArgs {
    /// Runs the node in a cluster: the ZeroMQ endpoint its mesh PUB socket
    /// binds, e.g. tcp://127.0.0.1:7001 (HOST:PORT is accepted too). Every
    /// node needs its own --node-id. See docs/cluster.md.
    #[arg(long, env = "CORECAST_MESH_BIND")]
    pub mesh_bind: Option<String>,

    /// The endpoint other nodes connect to (default: --mesh-bind; required
    /// when that binds 0.0.0.0).
    #[arg(long, env = "CORECAST_MESH_ADVERTISE")]
    pub mesh_advertise: Option<String>,

    /// Other nodes' mesh endpoints, comma-separated (this node's own is
    /// skipped, so every node may get the same list). With --redis, nodes
    /// also find each other in the registry.
    #[arg(long, env = "CORECAST_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Find peers only from --peers: do not register in (or read) the Redis
    /// node registry.
    #[arg(long, env = "CORECAST_NO_REGISTRY")]
    pub no_registry: bool,

    /// How often a node tells the others it is alive.
    #[arg(long, env = "CORECAST_HEARTBEAT_MS", default_value_t = 250)]
    pub heartbeat_ms: u64,

    /// A node not heard for this long is dead: its rooms move.
    #[arg(long, env = "CORECAST_NODE_TIMEOUT_MS", default_value_t = 2000)]
    pub node_timeout_ms: u64,

    /// ZeroMQ high-water mark per mesh socket, in messages; past it
    /// messages are dropped (and repaired from history by the receiver).
    #[arg(long, env = "CORECAST_MESH_HWM", default_value_t = 100_000)]
    pub mesh_hwm: i32,

    /// Fault injection for tests: drop every Nth room message this node
    /// publishes to the mesh, as a PUB socket at its high-water mark
    /// would (0: never).
    #[arg(long, hide = true, default_value_t = 0)]
    pub mesh_drop_every: u64,
}

/// A ZeroMQ TCP endpoint from `tcp://HOST:PORT` or `HOST:PORT`.
fn mesh_endpoint(flag: &str, v: &str) -> Result<String, ConfigError> {
    let addr = v.trim().strip_prefix("tcp://").unwrap_or(v.trim());
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => Ok(format!("tcp://{a}")),
        Err(_) => Err(ConfigError(format!(
            "{flag} {v:?}: expected tcp://IP:PORT or IP:PORT, e.g. tcp://127.0.0.1:7001"
        ))),
    }
}

/// Every subsystem's settings, built from one [`Config`] by
/// [`Config::validate`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Which page origins may upgrade.
    pub origins: crate::origin::Origins,
    pub plan: ShardPlan,
    pub chat: crate::chat::Settings,
    /// The public-key files, for reloads; `None` without RS256/ES256 keys.
    pub key_files: Option<crate::keys::KeyFiles>,
    pub storage: crate::storage::StorageConfig,
    /// `None` when the node runs alone.
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// The certificate and its rustls configuration; `None` without TLS.
    pub tls: Option<crate::tls::Tls>,
    /// The server API; `None` without --api-listen.
    pub api: Option<crate::api::ApiSettings>,
    /// The room namespaces and the file they are re-read from.
    pub namespace_file: namespaces::NamespaceFile,
    /// `--dev`: what the development side doors need; `None` outside it.
    pub dev: Option<crate::doors::Dev>,
}

/// The port `--listen` defaults to.
const DEFAULT_PORT: u16 = 8080;

/// The size of the secret `--dev` generates (HS256's key size, and
/// `auth::MIN_SECRET_BYTES`).
const DEV_SECRET_BYTES: usize = 32;

impl Config {
    /// Checks every flag and builds every subsystem's settings: the one
    /// place a configuration is validated. The first problem found is the
    /// error, a sentence that names the flag and what to do.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let limits = self.limits()?;
        let origins =
            crate::origin::Origins::parse(&self.conn.allowed_origins, self.conn.require_origin)
                .map_err(ConfigError)?;
        let plan = self.placement()?;
        let secret = self.token_secret()?;
        let (chat, key_files, namespace_file) = self.chat_settings(secret.as_deref())?;
        let storage = self.storage(&namespace_file.namespaces)?;
        let mesh = self.mesh(&storage)?;
        let tls = match (&self.tls.tls_cert, &self.tls.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::Tls::load(cert, key).map_err(ConfigError)?),
            _ => None,
        };
        let listen = self.listen();
        if self.tls.tls_listen == Some(listen) && listen.port() != 0 {
            return Err(ConfigError(format!(
                "--tls-listen {listen} is also --listen: give TLS its own port, or leave --tls-listen out to serve only TLS on --listen"
            )));
        }
        let api = self.api_settings(&chat)?;
        // `token_secret` gives --dev a secret whenever it is on.
        let dev = match (self.node.dev, secret) {
            (true, Some(token_secret)) => Some(crate::doors::Dev {
                token_secret,
                secret_generated: self.chat.jwt_secret.is_none(),
            }),
            _ => None,
        };
        Ok(Settings {
            limits,
            origins,
            plan,
            chat,
            key_files,
            storage,
            mesh,
            tls,
            api,
            namespace_file,
            dev,
        })
    }

    /// The address the listeners bind: `--listen`, or the default (loopback
    /// in `--dev`, every address otherwise).
    pub fn listen(&self) -> SocketAddr {
        let ip = match self.node.dev {
            true => std::net::Ipv4Addr::LOCALHOST,
            false => std::net::Ipv4Addr::UNSPECIFIED,
        };
        self.node
            .listen
            .unwrap_or(SocketAddr::from((ip, DEFAULT_PORT)))
    }

    /// The HS256 secret tokens are checked with: `--jwt-secret`, or in
    /// `--dev` without one, 32 random bytes drawn now (tokens then come
    /// from `/dev/token` only, and die with the process).
    fn token_secret(&self) -> Result<Option<Arc<[u8]>>, ConfigError> {
        match (&self.chat.jwt_secret, self.node.dev) {
            (Some(s), _) => Ok(Some(s.as_bytes().into())),
            (None, false) => Ok(None),
            (None, true) => {
                let rng = ring::rand::SystemRandom::new();
                let bytes: [u8; DEV_SECRET_BYTES] = ring::rand::generate(&rng)
                    .map_err(|_| {
                        ConfigError(
                            "--dev: the system's random source failed, so no token secret could be generated: give --jwt-secret (e.g. `openssl rand -hex 32`)"
                                .into(),
                        )
                    })?
                    .expose();
                Ok(Some(bytes.as_slice().into()))
            }
        }
    }

    fn api_settings(
        &self,
        chat: &crate::chat::Settings,
    ) -> Result<Option<crate::api::ApiSettings>, ConfigError> {
        let a = &self.api;
        let err = |m: String| Err(ConfigError(m));
        let Some(listen) = a.api_listen else {
            if !a.api_key.is_empty() {
                return err("--api-key without --api-listen: give the API an address (e.g. --api-listen 127.0.0.1:8081)".into());
            }
            return Ok(None);
        };
        if a.api_key.is_empty() {
            return err("--api-listen needs at least one --api-key (e.g. `openssl rand -hex 32`): every API call must authenticate".into());
        }
        if let Some(k) = a.api_key.iter().find(|k| k.len() < MIN_API_KEY_BYTES) {
            return err(format!(
                "an --api-key is {} bytes; use at least {MIN_API_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                k.len()
            ));
        }
        if a.api_key
            .iter()
            .any(|k| k.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return err("an --api-key holds whitespace or a control character: it could not be sent in an Authorization header".into());
        }
        if a.api_max_body_bytes == 0 || a.api_timeout_ms == 0 || a.api_max_in_flight == 0 {
            return err(
                "--api-max-body-bytes, --api-timeout-ms and --api-max-in-flight must be at least 1"
                    .into(),
            );
        }
        Ok(Some(crate::api::ApiSettings {
            listen,
            keys: a.api_key.iter().map(|k| k.as_bytes().into()).collect(),
            max_body_bytes: a.api_max_body_bytes,
            max_message_body_bytes: chat.session.max_body_bytes,
            namespaces: chat.session.namespaces.clone(),
            history_max_limit: chat.session.history_max_limit,
            timeout: std::time::Duration::from_millis(a.api_timeout_ms),
            max_in_flight: a.api_max_in_flight,
            max_broadcast_rooms: crate::api::MAX_BROADCAST_ROOMS,
        }))
    }
}

/// The shortest API key accepted.
const MIN_API_KEY_BYTES: usize = 16;

impl Config {
    /// The chat endpoint's settings, the public-key files when tokens may
    /// be RS256 or ES256, and the namespaces with the file they came from.
    #[allow(clippy::type_complexity)]
    fn chat_settings(
        &self,
        secret: Option<&[u8]>,
    ) -> Result<
        (
            crate::chat::Settings,
            Option<crate::keys::KeyFiles>,
            namespaces::NamespaceFile,
        ),
        ConfigError,
    > {
        let err = |m: String| Err(ConfigError(m));
        if let Some(secret) = &self.chat.jwt_secret {
            if secret.len() < crate::auth::MIN_SECRET_BYTES {
                return err(format!(
                    "--jwt-secret is {} bytes; HS256 needs at least {} (e.g. `openssl rand -hex 32`)",
                    secret.len(),
                    crate::auth::MIN_SECRET_BYTES
                ));
            }
        }
        if self.chat.max_rooms_per_connection == 0 {
            return err("--max-rooms-per-connection must be at least 1".into());
        }
        if !(self.chat.rate_limit_per_s > 0.0 && self.chat.rate_limit_burst >= 1.0) {
            return err(
                "--rate-limit-per-s must be above 0 and --rate-limit-burst at least 1".into(),
            );
        }
        if self.chat.max_body_bytes == 0 {
            return err("--max-body-bytes must be at least 1".into());
        }
        let key_files = crate::keys::KeyFiles::load(
            self.chat.jwt_public_key.as_deref(),
            self.chat.jwt_jwks.as_deref(),
        )
        .map_err(ConfigError)?;
        let leeway = self.chat.jwt_leeway_s;
        let verifier = match (&key_files, secret) {
            (Some(files), Some(s)) => {
                Some(crate::auth::Verifier::with_keys(files.keys(), leeway).and_secret(s))
            }
            (Some(files), None) => Some(crate::auth::Verifier::with_keys(files.keys(), leeway)),
            (None, Some(s)) => Some(crate::auth::Verifier::new(s, leeway)),
            (None, None) => None,
        };
        let default = corecast_router::namespace::Namespace {
            history_size: self.storage.history_size,
            history_ttl: Duration::from_secs(self.storage.history_ttl_s),
            ..corecast_router::namespace::Namespace::default_with(
                self.chat.presence_max_members,
                self.chat.max_body_bytes,
            )
        };
        // The demo page's typing indicator publishes to `typing:<room>`.
        let implied = match self.node.dev {
            true => vec![namespaces::dev_typing(&default)],
            false => Vec::new(),
        };
        let namespace_file = namespaces::NamespaceFile::load(
            self.node.config.clone(),
            default,
            implied,
            Duration::from_secs(self.storage.history_meta_ttl_s),
        )?;
        let session = corecast_router::session::Rules {
            namespaces: namespace_file.namespaces.clone(),
            verifier,
            allow_anonymous: self.chat.allow_anonymous || self.node.dev,
            max_rooms_per_connection: self.chat.max_rooms_per_connection,
            rate_limit_per_s: self.chat.rate_limit_per_s,
            rate_limit_burst: self.chat.rate_limit_burst,
            max_body_bytes: self.chat.max_body_bytes,
            history_max_limit: self.storage.history_size.clamp(1, MAX_HISTORY_LIMIT),
            // A connection without a token gets the handshake's time again
            // to send `connect`.
            auth_timeout: Duration::from_millis(self.conn.handshake_timeout_ms),
        };
        let chat = crate::chat::Settings {
            session,
            presence_ttl: Duration::from_secs(self.storage.presence_ttl_s),
            history_meta_ttl: Duration::from_secs(self.storage.history_meta_ttl_s),
            max_connections_per_user: Some(self.chat.max_connections_per_user).filter(|&n| n > 0),
            max_connections_per_ip: Some(self.chat.max_connections_per_ip).filter(|&n| n > 0),
        };
        Ok((chat, key_files, namespace_file))
    }

    /// The mesh settings; `None` when the node runs alone.
    /// `storage` is [`Config::storage`]'s answer: the node id and the
    /// registry's Redis come from it.
    fn mesh(
        &self,
        storage: &crate::storage::StorageConfig,
    ) -> Result<Option<crate::mesh::MeshConfig>, ConfigError> {
        let Some(bind) = &self.mesh.mesh_bind else {
            if self.mesh.mesh_advertise.is_some() || !self.mesh.peers.is_empty() {
                return Err(ConfigError(
                    "--peers and --mesh-advertise need --mesh-bind (the node's own mesh endpoint)"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let bind = mesh_endpoint("--mesh-bind", bind)?;
        let advertise = match &self.mesh.mesh_advertise {
            Some(a) => mesh_endpoint("--mesh-advertise", a)?,
            None if bind.contains("0.0.0.0") || bind.contains("[::]") => {
                return Err(ConfigError(format!(
                    "--mesh-bind {bind} listens on every address: give --mesh-advertise, the endpoint other nodes reach this one at"
                )))
            }
            None => bind.clone(),
        };
        let peers = self
            .mesh
            .peers
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| mesh_endpoint("--peers", p))
            .collect::<Result<Vec<_>, _>>()?;
        if self.mesh.heartbeat_ms == 0 || self.mesh.node_timeout_ms < 2 * self.mesh.heartbeat_ms {
            return Err(ConfigError(
                "--heartbeat-ms must be at least 1 and --node-timeout-ms at least twice it".into(),
            ));
        }
        if self.mesh.mesh_hwm < 1 {
            return Err(ConfigError("--mesh-hwm must be at least 1".into()));
        }
        if self.storage.node_id.is_none() {
            return Err(ConfigError(
                "--mesh-bind needs --node-id: every node of a cluster has its own name (e.g. --node-id gw-1)"
                    .into(),
            ));
        }
        if matches!(storage.kind, crate::storage::StoreKind::Memory) {
            log::warn!(
                "cluster without Redis: history, resume and gap repair work only on each room's home node, and a room that moves starts a new epoch (see docs/cluster.md)"
            );
        }
        Ok(Some(crate::mesh::MeshConfig {
            node_id: storage.node_id.as_str().into(),
            bind,
            advertise,
            peers,
            registry: match &storage.kind {
                crate::storage::StoreKind::Redis { url } if !self.mesh.no_registry => {
                    Some(url.clone())
                }
                _ => None,
            },
            heartbeat: Duration::from_millis(self.mesh.heartbeat_ms),
            node_timeout: Duration::from_millis(self.mesh.node_timeout_ms),
            hwm: self.mesh.mesh_hwm,
            queue: 65_536,
            drop_every: self.mesh.mesh_drop_every,
        }))
    }

    /// The storage worker's settings.
    fn storage(
        &self,
        namespaces: &corecast_router::namespace::Namespaces,
    ) -> Result<crate::storage::StorageConfig, ConfigError> {
        use crate::storage::{StorageConfig, StoreKind};
        let err = |m: String| Err(ConfigError(m));
        let kind = match (self.storage.store.as_deref(), &self.storage.redis) {
            (Some("memory"), Some(_)) => {
                return err("--redis was given with --store memory: drop one of them".into())
            }
            (Some("memory"), None) | (None, None) => StoreKind::Memory,
            (_, Some(url)) => StoreKind::Redis { url: url.clone() },
            (Some(_), None) => StoreKind::Redis {
                url: "redis://127.0.0.1:6379/".into(),
            },
        };
        if let StoreKind::Redis { url } = &kind {
            if let Err(e) = redis::Client::open(url.as_str()) {
                return err(format!(
                    "bad --redis URL {url:?}: {e} (expected redis://HOST:PORT/DB)"
                ));
            }
        }
        if self.storage.history_size > 1_000_000 {
            return err("--history-size must be at most 1000000".into());
        }
        if self.storage.history_ttl_s == 0
            || self.storage.history_meta_ttl_s < self.storage.history_ttl_s
        {
            return err(
                "--history-ttl-s must be at least 1 and --history-meta-ttl-s at least --history-ttl-s"
                    .into(),
            );
        }
        if !(1..=100_000).contains(&self.storage.storage_batch) || self.storage.storage_queue == 0 {
            return err("--storage-batch must be 1-100000 and --storage-queue at least 1".into());
        }
        if self.storage.redis_timeout_ms == 0 || self.storage.presence_ttl_s == 0 {
            return err("--redis-timeout-ms and --presence-ttl-s must be at least 1".into());
        }
        let node_id = self.storage.node_id.as_deref().unwrap_or("node-1");
        if node_id.is_empty()
            || node_id.len() > 64
            || !node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return err(format!(
                "--node-id {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                node_id
            ));
        }
        Ok(StorageConfig {
            kind,
            history_size: self.storage.history_size,
            history_ttl: Duration::from_secs(self.storage.history_ttl_s),
            namespaces: namespaces.clone(),
            meta_ttl: Duration::from_secs(self.storage.history_meta_ttl_s),
            batch_max: self.storage.storage_batch,
            queue_per_shard: self.storage.storage_queue,
            spill_dir: self.storage.spill_dir.clone(),
            redis_timeout: Duration::from_millis(self.storage.redis_timeout_ms),
            node_id: node_id.to_string(),
            presence_ttl: Duration::from_secs(self.storage.presence_ttl_s),
        })
    }
}

/// Most messages one `history` request may return.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// A list of CPU ids, parsed from `0-3,6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    crate::readiness::cpus::parse(s).map(CpuList)
}

/// Where each shard runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub shards: usize,
    /// `Some(cpus)`: shard i is pinned to `cpus[i]`. `None`: unpinned.
    pub pinned: Option<Vec<usize>>,
}

mod file;
pub mod namespaces;
pub use file::{example, with_file, with_text};

/// A configuration error, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks the configuration and derives the per-connection limits.
    fn limits(&self) -> Result<Limits, ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.conn.outbound_budget_bytes == 0 {
            return err(
                "--outbound-budget-bytes must be at least 1 (every connection would be a slow consumer)"
                    .into(),
            );
        }
        if self.conn.max_frame_bytes == 0 || self.conn.max_message_bytes == 0 {
            return err("--max-frame-bytes and --max-message-bytes must be at least 1".into());
        }
        if self.conn.max_frame_bytes > self.conn.max_message_bytes {
            return err(format!(
                "--max-frame-bytes ({}) is larger than --max-message-bytes ({}): a frame is part of a message, lower it",
                self.conn.max_frame_bytes, self.conn.max_message_bytes
            ));
        }
        if self.conn.max_message_bytes > (1 << 30) {
            return err("--max-message-bytes above 1 GiB is not supported".into());
        }
        if self.conn.max_header_bytes < 256 {
            return err(
                "--max-header-bytes below 256 cannot hold a WebSocket upgrade request".into(),
            );
        }
        for (name, v) in [
            ("--start-timeout-ms", self.node.start_timeout_ms),
            ("--handshake-timeout-ms", self.conn.handshake_timeout_ms),
            ("--idle-timeout-ms", self.conn.idle_timeout_ms),
            ("--close-timeout-ms", self.conn.close_timeout_ms),
            (
                "--slow-consumer-timeout-ms",
                self.conn.slow_consumer_timeout_ms,
            ),
        ] {
            if v == 0 {
                return err(format!("{name} must be at least 1"));
            }
        }
        if self.conn.ping_interval_ms != 0
            && self.conn.ping_interval_ms >= self.conn.idle_timeout_ms
        {
            return err(format!(
                "--ping-interval-ms ({}) must be below --idle-timeout-ms ({}) or the idle timeout fires before a ping can be answered",
                self.conn.ping_interval_ms, self.conn.idle_timeout_ms
            ));
        }
        for (name, v) in [
            ("--drain-delay-ms", self.node.drain_delay_ms),
            ("--drain-timeout-ms", self.node.drain_timeout_ms),
            ("--start-timeout-ms", self.node.start_timeout_ms),
        ] {
            if v > 3_600_000 {
                return err(format!(
                    "{name} ({v}) is over an hour: the value is in milliseconds"
                ));
            }
        }
        if self.node.backlog == 0 {
            return err("--backlog must be at least 1".into());
        }
        let ms = Duration::from_millis;
        Ok(Limits {
            frame: ws::Limits {
                max_frame_bytes: self.conn.max_frame_bytes as u64,
                max_message_bytes: self.conn.max_message_bytes as u64,
            },
            max_header_bytes: self.conn.max_header_bytes,
            handshake_timeout: ms(self.conn.handshake_timeout_ms),
            idle_timeout: ms(self.conn.idle_timeout_ms),
            ping_interval: (self.conn.ping_interval_ms != 0)
                .then(|| ms(self.conn.ping_interval_ms)),
            close_timeout: ms(self.conn.close_timeout_ms),
            outbound_budget_bytes: self.conn.outbound_budget_bytes,
            slow_consumer_timeout: ms(self.conn.slow_consumer_timeout_ms),
            drain_timeout: ms(self.node.drain_timeout_ms),
            drain_delay: ms(self.node.drain_delay_ms),
            start_timeout: ms(self.node.start_timeout_ms),
        })
    }

    /// Decides how many shards run where, from the flags and the CPUs this
    /// process is allowed to use.
    fn placement(&self) -> Result<ShardPlan, ConfigError> {
        let allowed = allowed_cpus();
        let cpus = match &self.node.cpus {
            Some(CpuList(list)) => {
                if let Some(c) = list.iter().find(|c| !allowed.contains(c)) {
                    return Err(ConfigError(format!(
                        "--cpus names CPU {c}, but this process may only run on {allowed:?}"
                    )));
                }
                list.clone()
            }
            None => allowed,
        };
        let shards = self.node.shards.unwrap_or(cpus.len());
        if shards == 0 {
            return Err(ConfigError("--shards must be at least 1".into()));
        }
        if shards > 256 {
            return Err(ConfigError(format!(
                "--shards {shards} is more than the 256 supported"
            )));
        }
        let pinned = (shards <= cpus.len()).then(|| cpus[..shards].to_vec());
        Ok(ShardPlan { shards, pinned })
    }
}

/// The CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    crate::readiness::cpus::allowed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_take_the_shared_cpu_list() {
        assert_eq!(
            config(&["--cpus", "0-1"]).node.cpus,
            Some(CpuList(vec![0, 1]))
        );
        let e = Config::try_parse_from(["gateway", "--cpus", "0,0"]).unwrap_err();
        assert!(e.to_string().contains("names CPU 0 twice"), "{e}");
    }

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("gateway").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let c = config(&[]);
        let l = c.limits().unwrap();
        assert_eq!(l.frame.max_frame_bytes, 1 << 20);
        assert_eq!(c.listen().to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn bad_combinations_are_refused_with_a_reason() {
        for args in [
            &["--max-frame-bytes", "100", "--max-message-bytes", "10"][..],
            &["--ping-interval-ms", "5000", "--idle-timeout-ms", "5000"],
            &["--handshake-timeout-ms", "0"],
            &["--max-header-bytes", "10"],
            &["--outbound-budget-bytes", "0"],
            &["--jwt-secret", "short"],
            &["--rate-limit-per-s", "0"],
            &["--max-rooms-per-connection", "0"],
            &["--history-ttl-s", "0"],
            &["--storage-batch", "0"],
            &["--node-id", "a b"],
            &["--peers", "127.0.0.1:7002"],
            &["--mesh-bind", "127.0.0.1:7001"],
            &["--drain-delay-ms", "4000000"],
        ] {
            let e = config(args).validate().unwrap_err();
            let flag = args[0];
            assert!(e.0.contains(flag), "{args:?}: {e} names the flag");
        }
        assert!(config(&["--shards", "0"]).placement().is_err());
    }

    #[test]
    fn dev_turns_on_anonymous_a_secret_and_the_typing_namespace() {
        let plain = config(&[]).validate().unwrap();
        assert!(plain.dev.is_none());
        assert!(!plain.chat.session.allow_anonymous);
        assert!(plain.chat.session.verifier.is_none());
        assert!(!plain.namespace_file.namespaces.of("typing:x").ephemeral);

        let dev = config(&["--dev"]).validate().unwrap();
        assert!(dev.chat.session.allow_anonymous);
        let d = dev.dev.as_ref().unwrap();
        assert!(d.secret_generated);
        let secret = d.token_secret.clone();
        assert_eq!(secret.len(), DEV_SECRET_BYTES);
        // The verifier takes what /dev/token mints with it.
        let token = crate::auth::mint(
            &secret,
            &crate::auth::Claims {
                sub: "alice".into(),
                ..Default::default()
            },
        );
        let verifier = dev.chat.session.verifier.as_ref().unwrap();
        assert_eq!(verifier.verify(&token, 0).unwrap().sub, "alice");
        let typing = dev.namespace_file.namespaces.of("typing:x");
        assert!(typing.ephemeral && typing.presence_max_members == 0);
        assert!(!dev.namespace_file.namespaces.of("x").ephemeral);
        let again = config(&["--dev"]).validate().unwrap();
        assert_ne!(again.dev.unwrap().token_secret, secret, "drawn at start");

        // A configured secret is the one tokens are minted and checked with.
        let given = "given-secret-0123456789abcdef0123456789";
        let dev = config(&["--dev", "--jwt-secret", given])
            .validate()
            .unwrap();
        let d = dev.dev.unwrap();
        assert!(!d.secret_generated);
        assert_eq!(&*d.token_secret, given.as_bytes());
    }

    #[test]
    fn more_shards_than_cpus_run_unpinned() {
        let n = allowed_cpus().len();
        let p = config(&["--shards", &(n + 2).to_string()])
            .placement()
            .unwrap();
        assert_eq!(p.shards, n + 2);
        assert_eq!(p.pinned, None);
        let p = config(&["--shards", "1"]).placement().unwrap();
        assert_eq!(p.pinned.unwrap().len(), 1);
    }
}
