//! Helpers for tests and benchmarks that need raw access below the mesh (hostile clients, raw quinn baselines).
//!
//! Not a stable API: hidden from the docs, used by this crate's integration tests and benchmark only.

use std::sync::Arc;

use crate::tls::{self, NodeIdentity};
use crate::{Limits, NodeId, TransportError};

/// A quinn client config that presents `identity` like a mesh node does.
pub fn client_config(
    identity: &NodeIdentity,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(crate::mesh::transport_config(limits)?));
    Ok(cfg)
}

/// A quinn client config that presents no certificate but trusts `identity`'s CA.
pub fn anonymous_client_config(
    identity: &NodeIdentity,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca_der().clone())
        .map_err(tls::TlsError::from)?;
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls::TlsError::from)?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![tls::ALPN_MESH.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg)
        .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(crate::mesh::transport_config(limits)?));
    Ok(cfg)
}

/// A quinn server config for `identity` with the mesh's TLS and transport settings (raw quinn baselines).
pub fn server_config(
    identity: &NodeIdentity,
    limits: &Limits,
) -> Result<quinn::ServerConfig, TransportError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config(false)?)
        .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(crate::mesh::transport_config(limits)?));
    Ok(cfg)
}

/// The TLS server name under which `node` is dialled.
pub fn server_name(node: NodeId) -> String {
    tls::node_dns_name(node)
}

/// Binds a UDP socket the way the mesh does (buffer sizes from `limits`).
pub fn bind_socket(
    addr: std::net::SocketAddr,
    limits: &Limits,
) -> Result<std::net::UdpSocket, TransportError> {
    crate::mesh::bind_socket(addr, limits.socket_buffer_bytes)
}

/// A quinn client config that presents `presented`'s certificate but trusts `trusted`'s CA: a node of another
/// cluster that knows our CA, to check that the server side refuses foreign client certificates.
pub fn foreign_client_config(
    presented: &NodeIdentity,
    trusted: &NodeIdentity,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(trusted.ca_der().clone())
        .map_err(tls::TlsError::from)?;
    let chain = vec![presented.cert_der().clone(), presented.ca_der().clone()];
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls::TlsError::from)?
        .with_root_certificates(Arc::new(roots))
        .with_client_auth_cert(chain, presented.key_der())
        .map_err(tls::TlsError::from)?;
    tls_cfg.alpn_protocols = vec![tls::ALPN_MESH.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg)
        .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(crate::mesh::transport_config(limits)?));
    Ok(cfg)
}
