//! TLS for the listeners: the certificate files (`--tls-cert`, `--tls-key`),
//! their reload, the rustls configuration every TLS connection starts from,
//! and, in [`stream`], one connection's TLS under the WebSocket codec.
//!
//! rustls with the `ring` provider only (aws-lc is a long C build here);
//! TLS 1.2 and 1.3, ALPN `http/1.1`, no client certificates.
//!
//! # Invariants
//! - The certificate in use is one `Arc<CertifiedKey>` behind an
//!   `ArcSwap`: a reload swaps it for every shard at once, a handshake that
//!   started keeps the one it picked, and open connections are untouched
//!   (their keys were derived at their handshake).
//! - A reload that fails (a missing file, a key that does not match the
//!   certificate, a chain that does not parse) changes nothing: the error is
//!   returned for the log and the old certificate stays.
//! - A client that names a server (SNI) the certificate does not cover is
//!   refused in the handshake; a client that names none (an IP address) gets
//!   the certificate.

pub mod stream;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};

/// Why a TLS connection failed; each is counted in
/// `corecast_tls_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client spoke plain HTTP to the TLS port (answered 400).
    PlainHttp,
    /// Bytes that are not TLS records, or a malformed handshake.
    Malformed,
    /// No TLS version (1.2, 1.3) or cipher suite in common, e.g. TLS 1.0.
    Version,
    /// Nothing else in common (groups, signature schemes, extensions, an
    /// ALPN offer without `http/1.1`).
    Incompatible,
    /// The client asked for a server name the certificate does not cover.
    Sni,
    /// The client refused the handshake with an alert (e.g. it does not
    /// trust the certificate).
    Alert,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// The client closed the connection before the handshake finished.
    Closed,
    Other,
}

impl Failure {
    pub const ALL: [Failure; 9] = [
        Failure::PlainHttp,
        Failure::Malformed,
        Failure::Version,
        Failure::Incompatible,
        Failure::Sni,
        Failure::Alert,
        Failure::Timeout,
        Failure::Closed,
        Failure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::PlainHttp => "plain_http",
            Failure::Malformed => "malformed",
            Failure::Version => "version",
            Failure::Incompatible => "incompatible",
            Failure::Sni => "sni",
            Failure::Alert => "alert",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Other => "other",
        }
    }

    /// What a rustls error says about the peer.
    pub fn of(e: &rustls::Error) -> Failure {
        use rustls::{Error as E, PeerIncompatible as P};
        match e {
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError => Failure::Malformed,
            // A hello without signature_algorithms is what TLS 1.0 and 1.1
            // clients send (the extension came with 1.2).
            E::PeerIncompatible(
                P::SignatureAlgorithmsExtensionRequired
                | P::SupportedVersionsExtensionRequired
                | P::ServerDoesNotSupportTls12Or13
                | P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::NoCipherSuitesInCommon,
            ) => Failure::Version,
            // ALPN offered without http/1.1 (h2 only): refused with
            // no_application_protocol.
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Failure::Incompatible,
            E::General(s) if s.contains("no server certificate") => Failure::Sni,
            E::AlertReceived(_) => Failure::Alert,
            _ => Failure::Other,
        }
    }
}

/// The certificate in use and what the log and metrics say about it.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// When the leaf certificate expires (Unix seconds).
    pub not_after: i64,
}

/// Picks the certificate for a handshake: the one in use, if it covers the
/// name the client asked for.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<Loaded>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.0.load();
        if let Some(name) = hello.server_name() {
            let leaf = current.key.end_entity_cert().ok()?;
            let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
            let name = ServerName::try_from(name).ok()?;
            cert.verify_is_valid_for_subject_name(&name).ok()?;
        }
        Some(current.key.clone())
    }
}

/// The TLS side of a node: where the certificate comes from, the one in use,
/// and the configuration every TLS connection starts from.
#[derive(Debug, Clone)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<ArcSwap<Loaded>>,
    config: Arc<ServerConfig>,
}

impl Tls {
    /// Reads the certificate chain and key; an error names the flag, the
    /// file and what is wrong.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let loaded = read(cert, key)?;
        let current = Arc::new(ArcSwap::from_pointee(loaded));
        // ring, not aws-lc (a long C build). rustls 0.23.48 deprecates the
        // ring provider for lacking post-quantum key exchange; X25519,
        // P-256 and P-384 are what it offers.
        #[allow(deprecated)]
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM with SHA-256 first, and the server's order wins: ten
        // AES rounds instead of fourteen, and a smaller key schedule kept
        // per connection than AES-256-GCM-SHA384 (which rustls clients
        // list first), at a security margin every peer accepts.
        provider.cipher_suites.sort_by_key(|s| match s.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 2,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 3,
            _ => 4,
        });
        // Key exchange: X25519 first. rustls 0.23.48's ring provider lists
        // P-384 first, which ring computes with generic bignum code: it made
        // a handshake cost ~0.8 ms of CPU here (perf: bn_mul_mont_nohw 64%).
        // Browsers send their key share for X25519 (or X25519MLKEM768,
        // which ring lacks) anyway.
        provider.kx_groups = kx_groups();
        let provider = Arc::new(provider);
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(current.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ignore_client_order = true;
        Ok(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current,
            config: Arc::new(config),
        })
    }

    /// What a new connection's TLS starts from.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// The certificate in use.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Reads the files again and, if they are sound, serves the new
    /// certificate to new handshakes. On an error the old one stays.
    pub fn reload(&self) -> Result<Arc<Loaded>, String> {
        let loaded = Arc::new(read(&self.cert, &self.key)?);
        self.current.store(loaded.clone());
        Ok(loaded)
    }

    /// When the files last changed (the later of the two), for the periodic
    /// check of `--tls-reload-interval-s`.
    pub fn files_changed_at(&self) -> Option<SystemTime> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        m(&self.cert).max(m(&self.key))
    }

    /// The certificate in use, in one line for the log.
    pub fn describe(loaded: &Loaded) -> String {
        let left = loaded.not_after - unix_now();
        let n = loaded.key.cert.len();
        format!(
            "{n} certificate{} in the chain, the leaf expires at Unix time {} ({})",
            if n == 1 { "" } else { "s" },
            loaded.not_after,
            if left < 0 {
                format!("EXPIRED {} days ago", -left / 86_400)
            } else {
                format!("in {} days", left / 86_400)
            }
        )
    }

    /// Writes `corecast_tls_cert_expiry_seconds`.
    pub fn render_metrics(&self, out: &mut String) {
        let name = "corecast_tls_cert_expiry_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When the served certificate expires (Unix time, seconds).\n# TYPE {name} gauge\n{name} {}",
            self.current.load().not_after
        );
    }
}

/// The key exchange groups, fastest first: X25519, P-256, P-384.
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1]
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {}", cert.display(), pem_error(e)))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "--tls-cert {}: no CERTIFICATE in the file (expected PEM)",
            cert.display()
        ));
    };
    let not_after = not_after(leaf).ok_or_else(|| {
        format!(
            "--tls-cert {}: the first certificate does not parse as X.509",
            cert.display()
        )
    })?;
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {}", key.display(), pem_error(e)))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| {
        format!(
            "--tls-key {}: not a usable RSA, ECDSA or Ed25519 key: {e}",
            key.display()
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "--tls-key {} does not belong to the certificate in --tls-cert {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot read it: {e}"),
        E::NoItemsFound => "no key or certificate of the expected kind in the file (expected PEM: CERTIFICATE, or PRIVATE KEY / RSA PRIVATE KEY / EC PRIVATE KEY)".into(),
        e => format!("not valid PEM: {e:?}"),
    }
}

/// The leaf's `notAfter`, in Unix seconds: Certificate ::= SEQUENCE {
/// tbsCertificate SEQUENCE { [0] version?, serial, signature, issuer,
/// validity SEQUENCE { notBefore, notAfter }, .. }, .. }.
fn not_after(der: &[u8]) -> Option<i64> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut next = || {
        let (tag, value, rest) = tlv(tbs)?;
        tbs = rest;
        Some((tag, value))
    };
    let (mut tag, mut value) = next()?;
    if tag == 0xa0 {
        (tag, value) = next()?; // the version: the serial follows
    }
    let _serial = (tag == 0x02).then_some(value)?;
    let _signature = next()?;
    let _issuer = next()?;
    let (tag, validity) = next()?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = tlv(validity)?;
    let (tag, time, _) = tlv(rest)?;
    parse_time(tag, time)
}

/// One DER tag-length-value: the tag, the value and what follows it.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |a, &b| (a << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, 1950-2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), in Unix seconds.
fn parse_time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |b: &[u8]| -> Option<i64> {
        b.iter().try_fold(0i64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let f = |i: usize| digits(&rest[i..i + 2]);
    let (month, day, h, m, sec) = (f(0)?, f(2)?, f(4)?, f(6)?, f(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
