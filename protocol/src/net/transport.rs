//! QUIC + mutual TLS endpoints and frame I/O on streams, shared by every binary.
//!
//! TLS 1.3 only, ring as the one crypto provider of the workspace (see
//! [`install_crypto_provider`]), ALPN [`crate::core::wire::ALPN`]. The server requires a client
//! certificate signed by the archive's CA; a certificate from anywhere else fails the
//! handshake.
//!
//! The client side takes [`ClientTls`] (where the server is, the PEMs, the
//! [`Timeouts`]), not the config file: the transport knows nothing of what else a config
//! holds. QUIC's own idle timeout is twice [`Timeouts::idle`] and keep-alives run at a
//! third of it: a connection to a vanished peer ends by itself, while a request that
//! makes no progress fails first, by its own idle deadline ([`crate::net::client`]), with
//! a message that says so, and the connection survives a peer that was only paused.
//! Keep-alives keep a connection to a wedged but living peer open: there only the
//! request deadlines end the wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};

use crate::core::wire::{self, FrameError};

/// Concurrent requests (bidirectional streams) one connection may have open. With the
/// per-stream window below this bounds what one client can make the server buffer.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// How long a closing client lets the endpoint flush its CONNECTION_CLOSE.
const CLOSE_LINGER: Duration = Duration::from_millis(3);
/// Flow-control window per stream.
const STREAM_WINDOW: u32 = 8 << 20;
/// Flow-control window per connection.
const CONNECTION_WINDOW: u32 = 32 << 20;

/// The crypto provider used everywhere (rustls panics when two are linked and none chosen).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default provider (for libraries that build their own
/// rustls configs, such as the S3 client). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses all certificates in a PEM string.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("unreadable certificate PEM")?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate found in PEM"));
    }
    Ok(certs)
}

/// Parses a private key from PEM.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .context("unreadable private key PEM")?
        .ok_or_else(|| anyhow!("no private key found in PEM"))
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_certs(ca_pem)? {
        roots.add(c).context("invalid CA certificate")?;
    }
    Ok(roots)
}

fn transport_config(idle: Duration) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(CONNECTION_WINDOW as u64);
    t.max_idle_timeout(Some(idle.try_into().context("idle timeout too large")?));
    t.keep_alive_interval(Some(idle / 3));
    Ok(t)
}

/// Builds the server endpoint: QUIC on `listen`, client certificates required.
pub fn server_endpoint(
    listen: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<quinn::Endpoint> {
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider.clone(),
    )
    .build()
    .context("building client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem)?, parse_key(key_pem)?)
        .context("server certificate and key do not match")?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(Duration::from_secs(60))?));
    quinn::Endpoint::server(server, listen)
        .with_context(|| format!("cannot listen on UDP {listen}"))
}

/// How long a client waits, for each kind of wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Resolving the address and completing the QUIC + TLS handshake.
    pub connect: Duration,
    /// A request that makes no progress (no byte sent or received) for this long fails;
    /// a connection whose peer does not answer at all (not even keep-alives) for twice
    /// this long is closed.
    pub idle: Duration,
    /// The most one request may take in all, however steadily it progresses.
    pub total: Duration,
}

impl Default for Timeouts {
    /// 10 s to connect, 60 s without progress, 10 min per request.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

/// What a client needs to reach the archive: built from the client config
/// ([`crate::net::config::ClientConfig::tls`]).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// `host:port` of archived (UDP).
    pub server: String,
    /// Name to verify in the server certificate.
    pub server_name: String,
    /// The archive's CA certificate, PEM.
    pub ca: String,
    /// The client certificate, PEM.
    pub cert: String,
    /// The client's private key, PEM.
    pub key: String,
    /// Connect, idle and total timeouts.
    pub timeouts: Timeouts,
}

/// Builds a client endpoint for the client certificate, with the given ALPN list.
pub fn client_endpoint_with_alpn(
    tls: &ClientTls,
    server: SocketAddr,
    alpn: Vec<Vec<u8>>,
) -> Result<quinn::Endpoint> {
    client_endpoint(quic_client_config(tls, alpn)?, server)
}

/// The QUIC client configuration: TLS 1.3 with the client certificate, the archive's CA
/// as the only root, `alpn`, and the idle timeout of `tls.timeouts`.
fn quic_client_config(tls: &ClientTls, alpn: Vec<Vec<u8>>) -> Result<quinn::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&tls.ca)?)
        .with_client_auth_cert(parse_certs(&tls.cert)?, parse_key(&tls.key)?)
        .context("client certificate and key do not match")?;
    config.alpn_protocols = alpn;
    let crypto = QuicClientConfig::try_from(config).context("TLS config unusable for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(
        tls.timeouts
            .idle
            .saturating_mul(2)
            .max(Duration::from_secs(1)),
    )?));
    Ok(client)
}

fn client_endpoint(client: quinn::ClientConfig, server: SocketAddr) -> Result<quinn::Endpoint> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let mut endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Resolves the configured server address.
pub async fn resolve(server: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve archive server address '{server}'"))?
        .next()
        .ok_or_else(|| anyhow!("archive server address '{server}' resolves to nothing"))
}

/// Why a connection to the archive could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address does not resolve, or no UDP socket could be opened.
    #[error("{0:#}")]
    Network(anyhow::Error),
    /// The certificates or key of the config are unusable.
    #[error("unusable TLS settings: {0:#}")]
    Tls(anyhow::Error),
    /// No completed handshake within the connect timeout.
    #[error("archive at {addr} did not complete the handshake within {} s (connect timeout)", after.as_secs_f64())]
    Timeout {
        /// Address tried.
        addr: SocketAddr,
        /// The connect timeout.
        after: Duration,
    },
    /// The handshake failed.
    #[error("TLS/QUIC handshake with archive at {addr} failed: {source}")]
    Handshake {
        /// Address tried.
        addr: SocketAddr,
        /// What quinn reported.
        source: quinn::ConnectionError,
    },
}

impl ConnectError {
    /// Whether one side's TLS refused the other (an untrusted certificate, an unknown
    /// protocol version): trying again cannot help, the configuration must change.
    pub fn is_refusal(&self) -> bool {
        match self {
            ConnectError::Tls(_) => true,
            ConnectError::Handshake { source, .. } => {
                let code = match source {
                    quinn::ConnectionError::TransportError(e) => e.code,
                    quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
                    quinn::ConnectionError::VersionMismatch => return true,
                    _ => return false,
                };
                // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff (RFC 9001 4.8).
                (0x100..0x200).contains(&u64::from(code))
            }
            ConnectError::Network(_) | ConnectError::Timeout { .. } => false,
        }
    }
}

/// A client connection to archived.
pub struct ArchiveConnection {
    /// The QUIC connection.
    pub connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl ArchiveConnection {
    /// Resolves, connects and completes the TLS handshake, all within
    /// `tls.timeouts.connect`.
    pub async fn connect(tls: &ClientTls) -> Result<ArchiveConnection, ConnectError> {
        let after = tls.timeouts.connect.max(Duration::from_millis(1));
        let started = std::time::Instant::now();
        // Resolving can hang too (a dead DNS server): the connect timeout covers it.
        let addr = tokio::time::timeout(after, resolve(&tls.server))
            .await
            .map_err(|_| {
                ConnectError::Network(anyhow!(
                    "cannot resolve archive server address '{}' within {} s",
                    tls.server,
                    after.as_secs_f64()
                ))
            })?
            .map_err(ConnectError::Network)?;
        let config =
            quic_client_config(tls, vec![wire::ALPN.to_vec()]).map_err(ConnectError::Tls)?;
        let endpoint = client_endpoint(config, addr).map_err(ConnectError::Network)?;
        let connecting = endpoint.connect(addr, &tls.server_name).map_err(|e| {
            ConnectError::Network(anyhow!("cannot connect to archive at {addr}: {e}"))
        })?;
        let connection = tokio::time::timeout(after.saturating_sub(started.elapsed()), connecting)
            .await
            .map_err(|_| ConnectError::Timeout { addr, after })?
            .map_err(|source| ConnectError::Handshake { addr, source })?;
        Ok(ArchiveConnection {
            connection,
            endpoint,
        })
    }

    /// Opens a stream and sends the request frame.
    pub async fn open(
        &self,
        request: &wire::Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, recv) = self
            .connection
            .open_bi()
            .await
            .context("cannot open a stream to the archive")?;
        write_frame(&mut send, request).await?;
        Ok((send, recv))
    }

    /// Sends a request with no body and reads the response frame.
    pub async fn call(
        &self,
        request: &wire::Request,
    ) -> Result<(wire::Response, quinn::RecvStream)> {
        let (mut send, mut recv) = self.open(request).await?;
        send.finish().context("closing request stream")?;
        let response = read_frame(&mut recv).await?;
        Ok((response, recv))
    }

    /// Closes the connection, giving the endpoint a moment to send the close frame so the
    /// server frees the connection at once instead of after its idle timeout. Waiting for
    /// the full draining period (3 PTO) would add ~100 ms to every archive_command call.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(CLOSE_LINGER, self.endpoint.wait_idle()).await;
    }
}

/// A request as the frame that starts its stream.
pub fn encode_request(request: &wire::Request) -> Vec<u8> {
    wire::encode_frame_unbounded(request)
}

/// Writes one frame; a message over the frame limit is refused before anything is sent
/// ([`FrameError::TooLarge`] in the error's chain).
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, message: &T) -> Result<()> {
    let frame = wire::encode_frame(message)?;
    send.write_all(&frame).await.context("sending frame")?;
    Ok(())
}

/// Errors reading a frame from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error: {0}")]
    Stream(#[from] quinn::ReadExactError),
}

/// Reads one frame, refusing oversized ones before allocating.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, ReadFrameError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFrameError::Frame(FrameError::Truncated),
        other => ReadFrameError::Stream(other),
    })?;
    let len = wire::frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFrameError::Frame(FrameError::Truncated),
        other => ReadFrameError::Stream(other),
    })?;
    Ok(wire::decode_frame(&payload)?)
}
