//! wss:// for loadgen: the rustls client configuration (`--ca PATH` or
//! `--insecure`), and the record layer a [`crate::client::Conn`] runs its
//! bytes through when its URL is `wss://`.
//!
//! rustls' buffered `ClientConnection`: the load generator's connections are
//! not the ones whose memory is measured, and its buffers keep the client
//! side simple. The *ring* provider, as in the gateway.

use std::{
    io::{self, Read, Write},
    os::fd::BorrowedFd,
    path::Path,
    sync::Arc,
};

use anyhow::{bail, Context as _};
use corecast_readiness::Io;
use rustix::io::Errno;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
};

/// What a `wss://` target connects with: the shared configuration and the
/// name its certificate must carry (sent as SNI unless it is an address).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.name == other.name
    }
}

impl Eq for TlsClient {}

/// ring, not aws-lc (see the gateway's tls module), with X25519 first as
/// browsers offer it (the provider's default puts P-384 first, which ring
/// computes slowly).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

/// The client configuration: trust the CA certificates in `ca` (PEM), or,
/// with `insecure`, any certificate at all (self-signed test servers).
pub fn client_config(ca: Option<&Path>, insecure: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS configuration")?;
    let config = match (ca, insecure) {
        (Some(_), true) => bail!("--ca and --insecure: give one of them"),
        (Some(path), false) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("--ca {}: {e:?}", path.display()))?;
            if certs.is_empty() {
                bail!("--ca {}: no CERTIFICATE in the file", path.display());
            }
            for c in certs {
                roots.add(c).with_context(|| {
                    format!("--ca {}: a certificate does not parse", path.display())
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
        (None, false) => bail!(
            "a wss:// URL needs --ca PATH (the CA certificate that signed the server's) or \
             --insecure (accept any certificate: test servers only)"
        ),
    };
    Ok(Arc::new(config))
}

/// `--insecure`: accepts any certificate, but still checks that the server
/// holds its key (the handshake signature).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One connection's TLS.
pub struct Stream(ClientConnection);

/// The socket as `Read`/`Write` for rustls, through its readiness flags:
/// `EAGAIN` becomes `WouldBlock`.
struct Socket<'a> {
    io: &'a Io,
    fd: BorrowedFd<'a>,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.recv(self.fd, buf).map_err(errno)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io.send(self.fd, buf).map_err(errno)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn errno(e: Errno) -> io::Error {
    if e == Errno::AGAIN {
        io::ErrorKind::WouldBlock.into()
    } else {
        e.into()
    }
}

impl Stream {
    pub fn new(client: &TlsClient) -> io::Result<Stream> {
        let mut conn = ClientConnection::new(client.config.clone(), client.name.clone())
            .map_err(io::Error::other)?;
        // The caller bounds what it queues (its in-flight limit); rustls'
        // own 64 KiB cap would refuse a burst instead.
        conn.set_buffer_limit(None);
        Ok(Stream(conn))
    }

    /// Ciphertext is waiting for the socket.
    pub fn pending(&self) -> bool {
        self.0.wants_write()
    }

    /// Takes plaintext (rustls holds it until the handshake is done) and
    /// sends what ciphertext it can. `WouldBlock`: the socket is full and
    /// ciphertext is still queued.
    pub fn write(&mut self, io: &Io, fd: BorrowedFd<'_>, plain: &[u8]) -> io::Result<()> {
        if !plain.is_empty() {
            self.0.writer().write_all(plain)?;
        }
        self.send(io, fd)
    }

    /// Sends queued ciphertext (handshake records too).
    pub fn send(&mut self, io: &Io, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut sock = Socket { io, fd };
        while self.0.wants_write() {
            self.0.write_tls(&mut sock)?;
        }
        Ok(())
    }

    /// Reads plaintext into `into`: `Ok(0)` is the end of the stream,
    /// `WouldBlock` means the socket has no more for now.
    pub fn read(&mut self, io: &Io, fd: BorrowedFd<'_>, into: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.reader().read(into) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server closed without close_notify: still the end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let n = self.0.read_tls(&mut Socket { io, fd })?;
            if n == 0 {
                return Ok(0);
            }
            let processed = self.0.process_new_packets().map_err(io::Error::other);
            // Whatever the handshake wants to say goes out now (a failure's
            // alert too); a full socket keeps it for the next write.
            match self.send(io, fd) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
            processed?;
        }
    }
}
