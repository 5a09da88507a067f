//! Cluster identity: the cluster CA, node certificates, join tokens and the rustls configurations built from them.
//!
//! Every node holds a certificate signed by the cluster CA whose subject common name and DNS SAN carry its
//! [`NodeId`]. Mesh connections are mutually authenticated against that CA only (no web PKI), and a dialler
//! checks that the server's certificate names the node it meant to reach. A [`JoinToken`] pins the CA by its
//! SHA-256 fingerprint and carries a secret with which a fresh node obtains a certificate from the head.
//!
//! This module is not the network: it builds certificates and configurations; `mesh` and `join` use them.
//! Private keys never leave the node that generated them (the join protocol sends a public key only).

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm,
};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use crate::NodeId;

/// ALPN of mesh connections.
pub(crate) const ALPN_MESH: &[u8] = b"oxray/1";
/// ALPN of the join protocol, served only by a head that holds the CA key.
pub(crate) const ALPN_JOIN: &[u8] = b"oxray-join/1";

const CA_COMMON_NAME: &str = "oxray cluster CA";
const NODE_CN_PREFIX: &str = "oxray-node-";
const TOKEN_PREFIX: &str = "oxj1";
/// Bytes of secret in a join token (256 bits).
pub(crate) const SECRET_LEN: usize = 32;

/// Failures while creating, storing, loading or checking cluster identities.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a key or certificate file failed; check the directory and its permissions.
    #[error("identity file {path}: {source}")]
    File {
        /// The file involved.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not hold the expected certificate or key; the file is corrupt or not an oxray identity.
    #[error("bad pem in {what}: {why}")]
    BadPem {
        /// Which file or object.
        what: String,
        /// What was wrong.
        why: String,
    },
    /// Certificate generation or signing failed (rcgen); this is a bug or an unsupported key type.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate does not carry an oxray node id in its subject; it was not issued by an oxray CA.
    #[error("certificate carries no oxray node id")]
    NoNodeId,
    /// A join token string could not be parsed; copy it again from `start --head`.
    #[error("malformed join token: {0}")]
    BadToken(&'static str),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA certificate.
    #[error("tls verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider: ring only (see crates-notes: two providers compiled in make rustls panic).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params(key: &KeyPair) -> CertificateParams {
    // The CA's parameters are a pure function of its public key, so a CA loaded from disk rebuilds the same
    // issuer name and key-identifier method that signed the certificates already issued. The name includes a
    // digest of the key so that two clusters' CAs never share a name (a foreign certificate then reads as
    // "unknown issuer" instead of "bad signature").
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let digest = fingerprint(key.public_key_raw());
    dn.push(
        DnType::CommonName,
        format!("{CA_COMMON_NAME} {}", hex::encode(&digest[..8])),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The DNS name a node's certificate is valid for; a dialler verifies the server against it.
pub(crate) fn node_dns_name(node: NodeId) -> String {
    format!("n{:032x}.oxray", node.0)
}

fn node_params(node: NodeId) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(vec![node_dns_name(node)])?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{NODE_CN_PREFIX}{:032x}", node.0),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let err = |source| TlsError::File {
        path: path.display().to_string(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    // `mode` applies only when the file is created; tighten an existing file too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    fs::write(path, data).map_err(|source| TlsError::File {
        path: path.display().to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::File {
        path: path.display().to_string(),
        source,
    })
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let data = read(path)?;
    CertificateDer::from_pem_slice(&data).map_err(|e| TlsError::BadPem {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

fn read_key(path: &Path) -> Result<KeyPair, TlsError> {
    let data = read(path)?;
    let text = String::from_utf8(data).map_err(|_| TlsError::BadPem {
        what: path.display().to_string(),
        why: "not utf-8".into(),
    })?;
    KeyPair::from_pem(&text).map_err(|e| TlsError::BadPem {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    // rcgen already depends on the `pem` format; writing it by hand keeps one less dependency surface.
    use std::fmt::Write as _;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = match *chunk {
            [a, b, c] => (u32::from(a) << 16) | (u32::from(b) << 8) | u32::from(c),
            [a, b] => (u32::from(a) << 16) | (u32::from(b) << 8),
            [a] => u32::from(a) << 16,
            _ => 0,
        };
        let chars = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, c) in chars.iter().enumerate() {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[*c as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Chunks of an ASCII string are valid UTF-8.
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// SHA-256 of a DER certificate: the CA fingerprint a join token pins.
pub(crate) fn fingerprint(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The cluster certificate authority: created once by `start --head`, it signs every node certificate.
///
/// Cloning is cheap (the key is shared). Dropping it drops the in-memory key only; the files stay.
#[derive(Clone)]
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    key: Arc<KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &hex::encode(self.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(&key).self_signed(&key)?;
        Ok(ClusterCa {
            cert: cert.der().clone(),
            key: Arc::new(key),
        })
    }

    /// Writes `ca.pem` (certificate) and `ca.key` (private key, mode 0600) into `dir`, which must exist.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        write_public(
            &dir.join("ca.pem"),
            pem("CERTIFICATE", &self.cert).as_bytes(),
        )?;
        write_private(&dir.join("ca.key"), self.key.serialize_pem().as_bytes())
    }

    /// Loads a CA saved by [`ClusterCa::save`].
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        let cert = read_cert(&dir.join("ca.pem"))?;
        let key = read_key(&dir.join("ca.key"))?;
        Ok(ClusterCa {
            cert,
            key: Arc::new(key),
        })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// SHA-256 of the CA certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert)
    }

    /// Issues a certificate and a fresh key for `node`.
    pub fn issue(&self, node: NodeId) -> Result<NodeIdentity, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = self.sign_public_key(node, &key)?;
        Ok(NodeIdentity {
            node_id: node,
            cert,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            ca: self.cert.clone(),
        })
    }

    /// Signs a certificate for `node` over a public key that the node generated (join protocol).
    pub(crate) fn sign_public_key(
        &self,
        node: NodeId,
        public: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let issuer = Issuer::new(ca_params(&self.key), &*self.key);
        let cert = node_params(node)?.signed_by(public, &issuer)?;
        Ok(cert.der().clone())
    }

    /// A join token with a fresh random secret. Give the same token to the head (`MeshConfig::join_secret`)
    /// and to the joining nodes.
    pub fn join_token(&self) -> JoinToken {
        JoinToken {
            ca_fingerprint: self.fingerprint(),
            secret: rand::random(),
        }
    }
}

/// A raw ECDSA P-256 public key received from a joining node.
#[derive(Debug)]
pub(crate) struct RawP256(pub(crate) Vec<u8>);

impl PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// One node's credentials: its certificate (carrying its [`NodeId`]), its private key and the CA certificate.
pub struct NodeIdentity {
    node_id: NodeId,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    ca: CertificateDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            node_id: self.node_id,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("ca_fingerprint", &hex::encode(fingerprint(&self.ca)))
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Assembles an identity from parts, checking that the certificate carries a node id.
    pub(crate) fn from_parts(
        cert: CertificateDer<'static>,
        key: PrivatePkcs8KeyDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<NodeIdentity, TlsError> {
        let node_id = node_id_from_cert(&cert)?;
        Ok(NodeIdentity {
            node_id,
            cert,
            key,
            ca,
        })
    }

    /// The node id read from the certificate.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The node certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate this identity trusts (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Writes `node.pem`, `node.key` (mode 0600) and `ca.pem` into `dir`, which must exist.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        write_public(
            &dir.join("node.pem"),
            pem("CERTIFICATE", &self.cert).as_bytes(),
        )?;
        write_public(&dir.join("ca.pem"), pem("CERTIFICATE", &self.ca).as_bytes())?;
        write_private(
            &dir.join("node.key"),
            pem("PRIVATE KEY", self.key.secret_pkcs8_der()).as_bytes(),
        )
    }

    /// Loads an identity saved by [`NodeIdentity::save`].
    pub fn load(dir: &Path) -> Result<NodeIdentity, TlsError> {
        let cert = read_cert(&dir.join("node.pem"))?;
        let ca = read_cert(&dir.join("ca.pem"))?;
        let key_path = dir.join("node.key");
        let key = PrivatePkcs8KeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| {
            TlsError::BadPem {
                what: key_path.display().to_string(),
                why: e.to_string(),
            }
        })?;
        NodeIdentity::from_parts(cert, key, ca)
    }

    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        // The CA certificate travels with the leaf so that a joining node can find the CA its token pins.
        vec![self.cert.clone(), self.ca.clone()]
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// Seed for this node's stateless-reset key: a restarted node with the same identity can then reset the
    /// connections its previous incarnation left behind, so peers notice at once instead of after the idle timeout.
    pub(crate) fn reset_key_seed(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"oxray stateless reset v1");
        ctx.update(self.key.secret_pkcs8_der());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Key of the connection-id hash, derived from the private key apart from the reset key (see `mesh`).
    pub(crate) fn cid_key(&self) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"oxray connection ids v1");
        ctx.update(self.key.secret_pkcs8_der());
        let d = ctx.finish();
        let mut out = [0u8; 8];
        out.copy_from_slice(&d.as_ref()[..8]);
        u64::from_le_bytes(out)
    }

    /// Server side of the mesh: requires a client certificate from our CA, unless `optional_client_auth`
    /// (a head serving joins, where the mesh layer then refuses cert-less mesh connections itself).
    pub(crate) fn server_config(
        &self,
        optional_client_auth: bool,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider());
        if optional_client_auth {
            builder = builder.allow_unauthenticated();
        }
        let verifier = builder.build()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        cfg.alpn_protocols = vec![ALPN_MESH.to_vec()];
        if optional_client_auth {
            cfg.alpn_protocols.push(ALPN_JOIN.to_vec());
        }
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// Client side of the mesh: presents our certificate and trusts only our CA.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain(), PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        cfg.alpn_protocols = vec![ALPN_MESH.to_vec()];
        Ok(cfg)
    }
}

/// What a new node needs to join: the CA fingerprint (to authenticate the head) and a shared secret
/// (to be authorised by the head). Text form: `oxj1-<64 hex fingerprint>-<64 hex secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    ca_fingerprint: [u8; 32],
    secret: [u8; SECRET_LEN],
}

impl JoinToken {
    /// SHA-256 of the CA certificate this token pins.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        self.ca_fingerprint
    }

    pub(crate) fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// Compares secrets in constant time so a network attacker learns nothing from response timing.
    pub(crate) fn secret_matches(&self, candidate: &[u8]) -> bool {
        if candidate.len() != SECRET_LEN {
            return false;
        }
        let diff = self
            .secret
            .iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is a credential: keep it out of logs.
        write!(
            f,
            "JoinToken(ca {}, secret hidden)",
            hex::encode(&self.ca_fingerprint[..8])
        )
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{}-{}",
            hex::encode(self.ca_fingerprint),
            hex::encode(self.secret)
        )
    }
}

impl FromStr for JoinToken {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(TlsError::BadToken("expected prefix oxj1"));
        }
        let mut field = |name: &'static str| -> Result<[u8; 32], TlsError> {
            let text = parts.next().ok_or(TlsError::BadToken(name))?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(text, &mut out).map_err(|_| TlsError::BadToken(name))?;
            Ok(out)
        };
        let ca_fingerprint = field("ca fingerprint must be 64 hex digits")?;
        let secret = field("secret must be 64 hex digits")?;
        if parts.next().is_some() {
            return Err(TlsError::BadToken("trailing fields"));
        }
        Ok(JoinToken {
            ca_fingerprint,
            secret,
        })
    }
}

/// What a head needs to answer join requests: the CA (to sign) and the token it accepts.
#[derive(Clone, Debug)]
pub struct JoinAuthority {
    /// The cluster CA, with its private key.
    pub ca: ClusterCa,
    /// The token joining nodes must present.
    pub token: JoinToken,
}

/// Client configuration for the join protocol: no client certificate; the server is trusted when its
/// certificate is signed by the CA whose fingerprint the token pins.
pub(crate) fn join_client_config(token: &JoinToken) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: token.ca_fingerprint,
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok(cfg)
}

/// Verifies a head's certificate against the CA named by fingerprint in a join token (trust on the token,
/// not on any pre-installed root).
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "head's certificate chain does not contain the CA pinned by the join token"
                        .into(),
                )
            })?;
        let node = node_id_from_cert(end_entity).map_err(|_| {
            rustls::Error::General("head's certificate carries no oxray node id".into())
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(node_dns_name(node))
            .map_err(|_| rustls::Error::General("invalid node name".into()))?;
        inner.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered (QUIC requires it).
        Err(rustls::Error::General("tls 1.2 is not used".into()))
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Reads the [`NodeId`] from a certificate's subject common name (`oxray-node-<32 hex>`).
///
/// Called only on certificates rustls has already verified against the cluster CA, but written to be safe on
/// any input: every length is checked, nothing panics.
pub fn node_id_from_cert(der: &[u8]) -> Result<NodeId, TlsError> {
    der_node_id(der).ok_or(TlsError::NoNodeId)
}

/// One DER TLV: (tag, contents, rest). `None` on any malformation.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn der_node_id(der: &[u8]) -> Option<NodeId> {
    const SEQ: u8 = 0x30;
    let (tag, cert, _) = der_tlv(der)?;
    if tag != SEQ {
        return None;
    }
    let (tag, mut tbs, _) = der_tlv(cert)?;
    if tag != SEQ {
        return None;
    }
    // tbsCertificate: [0] version (optional), serial, signature algorithm, issuer, validity, subject, ...
    let (tag, _, rest) = der_tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    let mut subject = None;
    for _ in 0..5 {
        let (_, content, rest) = der_tlv(tbs)?;
        subject = Some(content);
        tbs = rest;
    }
    let mut rdns = subject?;
    while !rdns.is_empty() {
        let (_, set, rest) = der_tlv(rdns)?;
        rdns = rest;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (_, attr, rest) = der_tlv(attrs)?;
            attrs = rest;
            let (oid_tag, oid, value) = der_tlv(attr)?;
            // 2.5.4.3 = commonName
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, text, _) = der_tlv(value)?;
                let text = std::str::from_utf8(text).ok()?;
                let hex_id = text.strip_prefix(NODE_CN_PREFIX)?;
                if hex_id.len() != 32 {
                    return None;
                }
                return u128::from_str_radix(hex_id, 16).ok().map(NodeId);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_node_id() {
        let ca = ClusterCa::generate().unwrap();
        let id = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let ident = ca.issue(id).unwrap();
        assert_eq!(node_id_from_cert(ident.cert_der()).unwrap(), id);
        // The CA certificate names no node.
        assert!(node_id_from_cert(ca.cert_der()).is_err());
    }

    #[test]
    fn der_walker_survives_every_truncation() {
        let ca = ClusterCa::generate().unwrap();
        let ident = ca.issue(NodeId(7)).unwrap();
        let der = ident.cert_der().to_vec();
        for n in 0..der.len() {
            let _ = node_id_from_cert(&der[..n]);
        }
    }

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let ca = ClusterCa::generate().unwrap();
        let t = ca.join_token();
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(t.secret_matches(parsed.secret()));
        assert!(!t.secret_matches(&[0u8; 32]));
        for bad in [
            "",
            "oxj1",
            "oxj2-00-00",
            &format!("{t}-x"),
            &t.to_string()[..70],
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_matches_rcgen() {
        let key = KeyPair::generate().unwrap();
        let ours = pem("PRIVATE KEY", &key.serialize_der());
        assert_eq!(
            ours.replace("\r\n", "\n"),
            key.serialize_pem().replace("\r\n", "\n")
        );
    }
}
