//! The cluster certificate authority, node identities, and the rustls configurations built
//! from them.
//!
//! Every node (and the admin CLI) holds an [`Identity`]: the CA certificate plus a leaf
//! certificate and key issued by the [`ClusterCa`]. Both ends of every connection present
//! their leaf and verify the other's against the CA; a certificate from anywhere else is
//! refused during the handshake. Leaves carry the DNS name [`SERVER_NAME`] besides the node
//! name, and clients always verify that name, so node addresses can change without
//! reissuing certificates.

use crate::error::{Result, RpcError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The TLS server name every node's certificate carries and every client verifies.
pub const SERVER_NAME: &str = "basalt";

/// ALPN protocol id: peers speaking another framing version fail the handshake cleanly
/// instead of exchanging frames they cannot read.
pub(crate) const ALPN: &[u8] = b"basalt-rpc/1";

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

/// Tolerated clock skew between the node that issues a certificate and its peers.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(25 * 365 * 24 * 3600);

/// The one crypto provider used by every configuration in this crate, passed explicitly so
/// nothing depends on a process-wide default being installed.
///
/// Its TLS 1.3 suites are ordered AES-128-GCM first (rustls prefers AES-256-GCM): every byte
/// of replica traffic is sealed once and opened once, and AES-128 has 10 rounds to AES-256's
/// 14 (AES-GCM was ~11% of the cluster's CPU in sequential writes). Both ends of every
/// connection use this list, so that is the suite they agree on; it is also the suite QUIC
/// protects its Initial packets with, and 128-bit AES is well within what TLS 1.3 requires.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(provider)
    });
    PROVIDER.clone()
}

/// The cluster's certificate authority, made once at bootstrap.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new self-signed CA (ECDSA P-256) for the cluster `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("basalt cluster CA {cluster_name}"));
        dn.push(DnType::OrganizationName, cluster_name);
        params.distinguished_name = dn;
        // Path length 0: the CA signs node certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA certificate, PEM encoded (what every node trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM encoded. Whoever holds it can admit nodes to the cluster.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`, creating it if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(CA_KEY_FILE), self.key_pem().as_bytes(), 0o600)?;
        Ok(())
    }

    /// Loads a CA written by [`ClusterCa::save`].
    pub fn load(dir: &Path) -> Result<ClusterCa> {
        let cert_pem = read_file(&dir.join(CA_CERT_FILE))?;
        let key_pem = read_file(&dir.join(CA_KEY_FILE))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(ClusterCa { cert_pem, issuer })
    }

    /// Issues a certificate for the node (or tool) `name`: CN = `name`, DNS names `name` and
    /// [`SERVER_NAME`], usable for both client and server authentication.
    pub fn issue(&self, name: &str) -> Result<Identity> {
        let mut sans = vec![name.to_owned()];
        if name != SERVER_NAME {
            sans.push(SERVER_NAME.to_owned());
        }
        self.leaf(name, sans, vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// Issues a server certificate for a service clients outside the cluster reach (the S3
    /// gateway's HTTPS): CN = `name`, the host names and IP addresses in `sans`.
    pub fn issue_server(&self, name: &str, sans: &[String]) -> Result<Identity> {
        self.leaf(name, sans.to_vec(), vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A leaf certificate signed by this CA: CN = `name`, subject alternative names `sans`.
    fn leaf(&self, name: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>) -> Result<Identity> {
        validate_name(name)?;
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity { ca_pem: self.cert_pem.clone(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// What a node needs to take part in the cluster: the CA it trusts and its own certificate
/// and private key, all PEM encoded.
#[derive(Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("name", &self.name()).finish_non_exhaustive()
    }
}

impl Identity {
    /// Writes `ca.pem`, `<name>.pem` and `<name>.key` (mode 0600) into `dir`, creating it if
    /// needed.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        validate_name(name)?;
        fs::create_dir_all(dir)?;
        write_file(&dir.join(CA_CERT_FILE), self.ca_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{name}.pem")), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{name}.key")), self.key_pem.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Loads an identity written by [`Identity::save`], checking that the files parse.
    pub fn load(dir: &Path, name: &str) -> Result<Identity> {
        validate_name(name)?;
        let identity = Identity {
            ca_pem: read_file(&dir.join(CA_CERT_FILE))?,
            cert_pem: read_file(&dir.join(format!("{name}.pem")))?,
            key_pem: read_file(&dir.join(format!("{name}.key")))?,
        };
        identity.roots()?;
        identity.chain()?;
        identity.key()?;
        Ok(identity)
    }

    /// The common name of the certificate (the node name it was issued for), if readable.
    pub fn name(&self) -> Option<String> {
        let chain = self.chain().ok()?;
        chain.first().and_then(|der| common_name(der))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| RpcError::Tls(format!("CA certificate: {e}")))?;
            roots.add(cert).map_err(|e| RpcError::Tls(format!("CA certificate: {e}")))?;
            count += 1;
        }
        if count == 0 {
            return Err(RpcError::Tls("no CA certificate in ca.pem".into()));
        }
        Ok(Arc::new(roots))
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RpcError::Tls(format!("node certificate: {e}")))?;
        if chain.is_empty() {
            return Err(RpcError::Tls("no certificate in the node certificate file".into()));
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| RpcError::Tls(format!("node key: {e}")))
    }

    /// Server side: present our certificate, and require a client certificate that chains
    /// to the cluster CA.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| RpcError::Tls(format!("client verifier: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RpcError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.key()?)
            .map_err(|e| RpcError::Tls(format!("node certificate/key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: present our certificate, and accept only a server certificate that
    /// chains to the cluster CA and names [`SERVER_NAME`].
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RpcError::Tls(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, self.key()?)
            .map_err(|e| RpcError::Tls(format!("node certificate/key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Key material for QUIC stateless resets, derived from our private key so that a
    /// restarted node tells peers at once that their old connections are gone (instead of
    /// them waiting for the idle timeout). The key never leaves the HMAC.
    pub(crate) fn reset_key(&self) -> Result<ring::hmac::Key> {
        let key = self.key()?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"basalt-rpc stateless reset key v1\0");
        ctx.update(key.secret_der());
        Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref()))
    }
}

/// The common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Names end up in file names and DNS SANs: keep them to a safe, portable alphabet.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RpcError::InvalidName(name.to_owned()))
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map_err(|e| RpcError::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))))
}

/// Writes through a temporary file and a rename, so a crash never leaves a half-written key
/// or certificate, and creates the file with `mode` so a key is never readable by others,
/// even briefly.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let annotate =
        |e: std::io::Error| RpcError::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let result = (|| {
        let mut file =
            fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(annotate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_files_with_a_private_key_mode() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let ca = ClusterCa::generate("test")?;
        ca.save(dir.path())?;
        let ca = ClusterCa::load(dir.path())?;
        let id = ca.issue("node-1")?;
        let node_dir = dir.path().join("node-1");
        id.save(&node_dir, "node-1")?;
        let loaded = Identity::load(&node_dir, "node-1")?;
        assert_eq!(loaded.cert_pem, id.cert_pem);
        assert_eq!(loaded.key_pem, id.key_pem);
        assert_eq!(loaded.ca_pem, ca.cert_pem());
        assert_eq!(loaded.name().as_deref(), Some("node-1"));
        let mode = fs::metadata(node_dir.join("node-1.key"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(dir.path().join("ca.key"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        Ok(())
    }

    #[test]
    fn peers_agree_on_aes_128_gcm() -> Result<()> {
        // A handshake in memory between two node identities, as two nodes' QUIC endpoints do.
        let ca = ClusterCa::generate("test")?;
        let (a, b) = (ca.issue("node-1")?, ca.issue("node-2")?);
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).map_err(|e| RpcError::Tls(e.to_string()))?;
        let mut client = rustls::ClientConnection::new(Arc::new(a.client_config()?), name)
            .map_err(|e| RpcError::Tls(e.to_string()))?;
        let mut server =
            rustls::ServerConnection::new(Arc::new(b.server_config()?)).map_err(|e| RpcError::Tls(e.to_string()))?;
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire)?;
            server.read_tls(&mut wire.as_slice())?;
            server.process_new_packets().map_err(|e| RpcError::Tls(e.to_string()))?;
            let mut wire = Vec::new();
            server.write_tls(&mut wire)?;
            client.read_tls(&mut wire.as_slice())?;
            client.process_new_packets().map_err(|e| RpcError::Tls(e.to_string()))?;
        }
        assert!(!client.is_handshaking() && !server.is_handshaking(), "handshake did not finish");
        for suite in [client.negotiated_cipher_suite(), server.negotiated_cipher_suite()] {
            assert_eq!(suite.map(|s| s.suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        }
        Ok(())
    }

    #[test]
    fn node_names_that_could_escape_the_directory_are_refused() -> Result<()> {
        let ca = ClusterCa::generate("test")?;
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(matches!(ca.issue(bad), Err(RpcError::InvalidName(_))), "{bad:?}");
        }
        Ok(())
    }
}
