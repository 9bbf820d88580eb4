//! QUIC + mutual TLS endpoints and frame I/O on streams, shared by every binary.
//!
//! TLS 1.3 only, ring as the one crypto provider of the workspace (see
//! [`install_crypto_provider`]), ALPN [`crate::core::wire::ALPN`]. The server requires a client
//! certificate signed by the archive's CA; a certificate from anywhere else fails the
//! handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};

use crate::core::wire::{self, FrameError};
use crate::net::config::ClientConfig;

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

/// Builds a client endpoint for the config's certificate, with the given ALPN list.
pub fn client_endpoint_with_alpn(
    cfg: &ClientConfig,
    server: SocketAddr,
    alpn: Vec<Vec<u8>>,
) -> Result<quinn::Endpoint> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&cfg.ca_cert)?)
        .with_client_auth_cert(parse_certs(&cfg.client_cert)?, parse_key(&cfg.client_key)?)
        .context("client certificate and key do not match")?;
    tls.alpn_protocols = alpn;
    let crypto = QuicClientConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(Duration::from_secs(
        cfg.timeout_secs.max(1),
    ))?));
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

/// A client connection to archived.
pub struct ArchiveConnection {
    /// The QUIC connection.
    pub connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl ArchiveConnection {
    /// Connects and completes the TLS handshake, within the config's timeout.
    pub async fn connect(cfg: &ClientConfig) -> Result<ArchiveConnection> {
        let addr = resolve(&cfg.server).await?;
        let endpoint = client_endpoint_with_alpn(cfg, addr, vec![wire::ALPN.to_vec()])?;
        let connecting = endpoint
            .connect(addr, &cfg.server_name)
            .with_context(|| format!("cannot connect to archive at {addr}"))?;
        let connection =
            tokio::time::timeout(Duration::from_secs(cfg.timeout_secs.max(1)), connecting)
                .await
                .map_err(|_| {
                    anyhow!(
                        "archive at {addr} did not answer within {} s",
                        cfg.timeout_secs
                    )
                })?
                .with_context(|| format!("TLS/QUIC handshake with archive at {addr} failed"))?;
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

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, message: &T) -> Result<()> {
    send.write_all(&wire::encode_frame(message))
        .await
        .context("sending frame")?;
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
