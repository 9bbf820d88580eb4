//! Who is asking: the protocol version by ALPN, and the client certificate's cluster and
//! role. A connection that fails either is closed before any request is read.

use walvault_protocol::core::wire;
use walvault_protocol::net::pki::{client_identity, ClientIdentity};

/// The identity of a connected client, or why the connection is refused.
pub(crate) fn peer_identity(connection: &quinn::Connection) -> Result<ClientIdentity, String> {
    let alpn = connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(wire::ALPN) {
        return Err("unsupported protocol version (ALPN)".into());
    }
    let certs = connection
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    client_identity(leaf)
}
