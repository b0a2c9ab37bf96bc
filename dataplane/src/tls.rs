//! TLS on the worker: termination (certificates and keys from PEM files, the
//! certificate store — default pair plus SNI pairs, swapped whole on reload — and the
//! rustls server configurations every core shares: one session-ticket key set, one
//! resolver), and the client side towards apps that serve HTTPS ([`Upstream`]). The record layer itself is driven sans-IO by [`crate::io::TcpConn`]
//! over the core's own non-blocking sockets; nothing here does I/O except reading
//! the PEM files.
//!
//! Provider: `ring` (builds with a C compiler only, no cmake; quick on small build
//! machines).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use appproxy_shared::tls_roots::{self, Anchors};

/// ALPN identifiers the HTTP frontends accept without HTTP/2 (and the API port).
pub const HTTP_ALPN: &[&[u8]] = &[b"http/1.1"];

/// ALPN identifiers the HTTP frontends accept with `[http2] enabled` (the server's
/// preference first), and what the worker offers to `http2`/`grpc` apps over TLS.
pub const H2_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Largest TLS output or plaintext held per connection (rustls buffers), bytes.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// One certificate chain and its private key, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPaths {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub privkey: PathBuf,
}

/// Why a certificate or key could not be loaded; names the file and the key to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads one chain and key, checking that the key is the leaf's.
fn load_pair(
    paths: &CertPaths,
    what: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_path = paths.cert.display();
    let key_path = paths.privkey.display();
    let cert_bytes = std::fs::read(&paths.cert).map_err(|e| {
        TlsError(format!(
            "{what}: cannot read certificate file {cert_path}: {e}"
        ))
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{what}: certificate file {cert_path} is not valid PEM: {e}"
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{what}: certificate file {cert_path} holds no CERTIFICATE block"
        )));
    }
    for (i, c) in chain.iter().enumerate() {
        if webpki::EndEntityCert::try_from(c).is_err() {
            return Err(TlsError(format!(
                "{what}: certificate {} in {cert_path} is not a valid X.509 certificate",
                i + 1
            )));
        }
    }
    let key_bytes = std::fs::read(&paths.privkey).map_err(|e| {
        TlsError(format!(
            "{what}: cannot read private key file {key_path}: {e}"
        ))
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        TlsError(format!(
            "{what}: private key file {key_path} holds no usable private key (PKCS#8, PKCS#1 RSA or SEC1 EC PEM): {e}"
        ))
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError(format!(
            "{what}: private key {key_path} does not match the certificate {cert_path}"
        )),
        e => TlsError(format!(
            "{what}: private key {key_path} cannot be used ({e}; RSA, ECDSA P-256/P-384 and Ed25519 are supported)"
        )),
    })
}

/// The certificates served: the default pair, and pairs chosen by SNI.
struct CertStore {
    /// Served when no SNI pair matches (or the client sent no SNI).
    default: Arc<CertifiedKey>,
    /// Tried in order; the first whose leaf is valid for the SNI name (wildcards
    /// per RFC 6125, as clients check them) and whose key signs with a scheme the
    /// client offers wins: an RSA and an ECDSA pair for one name each serve the
    /// clients that verify them ([`CertStore::pick`]).
    by_name: Vec<Arc<CertifiedKey>>,
}

impl CertStore {
    fn load(
        default: &CertPaths,
        sni: &[CertPaths],
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        let default = Arc::new(load_pair(
            default,
            "[worker] tls_cert/tls_privkey",
            provider,
        )?);
        let by_name = sni
            .iter()
            .enumerate()
            .map(|(i, p)| {
                load_pair(p, &format!("[worker] tls_sni_certs[{i}]"), provider).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { default, by_name })
    }

    /// The pair for a client naming `sni` and offering `schemes`: the first pair
    /// valid for the name whose key signs with one of them, schemes TLS 1.3 allows
    /// tried first (rustls sees a TLS 1.3 client's PKCS#1 schemes here, and drops
    /// them only once the pair is chosen: an ECDSA and PKCS#1-only client must get
    /// the ECDSA pair); else the first valid for the name (the client offers
    /// nothing it could verify: its handshake fails as it would anyway); else the
    /// default. Before, the first pair valid for the name was served whatever the
    /// client offered, so of an RSA and an ECDSA pair for one name, the second was
    /// never served and clients verifying only its kind failed.
    fn pick(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> Arc<CertifiedKey> {
        let Some(name) = sni.and_then(|s| ServerName::try_from(s).ok()) else {
            return self.default.clone();
        };
        let named: Vec<&Arc<CertifiedKey>> = self
            .by_name
            .iter()
            .filter(|ck| {
                ck.cert.first().is_some_and(|leaf| {
                    webpki::EndEntityCert::try_from(leaf)
                        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
            .collect();
        let modern: Vec<SignatureScheme> =
            schemes.iter().copied().filter(|s| !is_legacy(*s)).collect();
        [&modern[..], schemes]
            .iter()
            .find_map(|offered| {
                named
                    .iter()
                    .find(|ck| ck.key.choose_scheme(offered).is_some())
            })
            .or(named.first())
            .map_or_else(|| self.default.clone(), |ck| Arc::clone(ck))
    }
}

/// Signature schemes TLS 1.3 does not allow for its handshake signature (RFC 8446
/// §4.2.3: PKCS#1 v1.5 and SHA-1 are for certificates and TLS 1.2 only).
fn is_legacy(scheme: SignatureScheme) -> bool {
    matches!(
        scheme,
        SignatureScheme::RSA_PKCS1_SHA1
            | SignatureScheme::RSA_PKCS1_SHA256
            | SignatureScheme::RSA_PKCS1_SHA384
            | SignatureScheme::RSA_PKCS1_SHA512
            | SignatureScheme::ECDSA_SHA1_Legacy
    )
}

/// The resolver every handshake asks; its store is replaced whole on reload, so a
/// handshake sees either the old or the new set, and live connections keep theirs.
struct Resolver {
    store: RwLock<Arc<CertStore>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Some(store.pick(hello.server_name(), hello.signature_schemes()))
    }
}

/// The worker's TLS settings, shared by every core: cloning shares the resolver
/// and the ticket keys.
#[derive(Clone)]
pub struct Tls {
    /// For HTTP frontends and the API port (ALPN `http/1.1`).
    pub http: Arc<ServerConfig>,
    /// For raw TCP circuits (no ALPN: any protocol rides inside).
    pub raw: Arc<ServerConfig>,
    /// For HTTP frontends serving HTTP/2 too (ALPN `h2`, `http/1.1`).
    pub h2: Arc<ServerConfig>,
    /// The certificate store behind all three.
    resolver: Arc<Resolver>,
    /// Where the default pair comes from (for logs).
    default_paths: CertPaths,
    /// How many SNI pairs there are (for logs).
    sni_count: usize,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.default_paths.cert)
            .field("sni_certs", &self.sni_count)
            .finish()
    }
}

impl Tls {
    /// Loads every pair and builds the configurations (TLS 1.2 and 1.3, session
    /// tickets from one rotating key set shared by all cores, a session-ID cache
    /// for TLS 1.2 clients without tickets).
    pub fn load(default: &CertPaths, sni: &[CertPaths]) -> Result<Self, TlsError> {
        let provider = provider();
        let store = CertStore::load(default, sni, &provider)?;
        let resolver = Arc::new(Resolver {
            store: RwLock::new(Arc::new(store)),
        });
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError(format!("cannot create the session-ticket keys: {e}")))?;
        let mut raw = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS configuration: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        raw.ticketer = ticketer;
        raw.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
        raw.max_early_data_size = 0;
        let mut http = raw.clone();
        http.alpn_protocols = HTTP_ALPN.iter().map(|p| p.to_vec()).collect();
        let mut h2 = raw.clone();
        h2.alpn_protocols = H2_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            http: Arc::new(http),
            h2: Arc::new(h2),
            raw: Arc::new(raw),
            resolver,
            default_paths: default.clone(),
            sni_count: sni.len(),
        })
    }

    /// Serves the pairs of `other` (loaded from a freshly validated config on
    /// SIGHUP) from now on, for new handshakes: the ticket keys and the live
    /// connections stay.
    pub fn adopt(&self, other: &Tls) {
        let store = other
            .resolver
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        *self
            .resolver
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner) = store;
    }

    /// A fresh server-side session for one accepted connection.
    pub fn session(&self, raw_tcp: bool) -> Result<rustls::ServerConnection, rustls::Error> {
        self.session_with(if raw_tcp { &self.raw } else { &self.http })
    }

    /// A fresh server-side session offering `h2` before `http/1.1` (HTTP frontends
    /// with `[http2] enabled`).
    pub fn session_h2(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        self.session_with(&self.h2)
    }

    fn session_with(
        &self,
        config: &Arc<ServerConfig>,
    ) -> Result<rustls::ServerConnection, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(config.clone())?;
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(conn)
    }
}

/// Completes the handshake of an accepted TLS connection within the head timeout,
/// counting it; false when the connection is to be dropped (it was logged).
pub async fn handshake(
    core: &crate::core::Core,
    conn: &crate::io::TcpConn,
    peer: std::net::SocketAddr,
) -> bool {
    use crate::core::counter;
    core.metrics.add(counter::TLS_HANDSHAKING, 1);
    // The head timeout from the accept (a PROXY protocol header took part of it).
    conn.set_timeout_within(core.rt.head_timeout);
    // Nothing in hand until its first bytes (nginx's reusable connections): at the
    // connection cap a client that never sends its ClientHello may be closed to
    // admit a new one.
    conn.set_reusable(true, false);
    let done = conn.handshake().await;
    core.metrics.sub(counter::TLS_HANDSHAKING, 1);
    match done {
        Ok(()) => {
            // Done: what serves it says from now on whether it has anything in
            // hand (an HTTP connection waiting for its first request has not; a
            // tunnel always has, and is never closed for a new connection).
            conn.set_reusable(false, false);
            let resumed = conn.tls_resumed();
            core.metrics.add(
                if resumed {
                    counter::TLS_RESUMED
                } else {
                    counter::TLS_FULL
                },
                1,
            );
            if let Some(info) = conn.tls_info() {
                tracing::debug!(
                    peer = %peer,
                    version = ?info.version,
                    alpn = info.alpn.as_deref().map(String::from_utf8_lossy).as_deref(),
                    sni = info.sni.as_deref(),
                    resumed,
                    "TLS handshake complete"
                );
            }
            true
        }
        Err(_) if conn.was_shed() => {
            tracing::debug!(peer = %peer, "closed before its handshake to admit a new connection");
            false
        }
        Err(e) => {
            core.metrics.add(counter::TLS_FAILED, 1);
            if e.kind() == std::io::ErrorKind::TimedOut {
                core.metrics.add(counter::TIMEOUT_TLS_HANDSHAKE, 1);
            }
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed; connection closed");
            false
        }
    }
}

/// TLS towards apps that serve HTTPS (routes with `upstream_tls`): one client
/// configuration that checks the app's certificate against `[upstream] tls_ca` or
/// the system roots, and one that does not, for circuits that say so. Shared by
/// every core (sessions resume across them).
#[derive(Clone)]
pub struct Upstream {
    verify: Arc<rustls::ClientConfig>,
    insecure: Arc<rustls::ClientConfig>,
    /// The same two, offering only `h2` (apps of `http2` and `grpc` circuits).
    verify_h2: Arc<rustls::ClientConfig>,
    insecure_h2: Arc<rustls::ClientConfig>,
    /// Trust anchors loaded (for logs).
    roots: usize,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("roots", &self.roots)
            .finish()
    }
}

impl Upstream {
    /// Loads the trust anchors: `ca` (an error names it when it is unreadable or
    /// holds no certificate), else the system bundle (`SSL_CERT_FILE` or the usual
    /// places; none found leaves verification failing, with the reason logged).
    pub fn load(ca: Option<&Path>) -> Result<Self, TlsError> {
        let roots = match ca {
            Some(path) => tls_roots::load_pem_bundle(path, "[upstream] tls_ca", Anchors::Every)
                .map_err(|e| TlsError(e.0))?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let found = tls_roots::system_bundle_candidates(&|k| std::env::var_os(k))
                    .find_map(|p| std::fs::read(p).ok());
                if let Some(bytes) = found {
                    tls_roots::add_usable(&mut roots, &bytes);
                }
                roots
            }
        };
        let provider = provider();
        let n = roots.len();
        let verify = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let insecure = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS configuration: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        let with_alpn = |c: &rustls::ClientConfig, alpn: &[&[u8]]| {
            let mut c = c.clone();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        };
        Ok(Self {
            verify_h2: with_alpn(&verify, &H2_ALPN[..1]),
            insecure_h2: with_alpn(&insecure, &H2_ALPN[..1]),
            verify: with_alpn(&verify, HTTP_ALPN),
            insecure: with_alpn(&insecure, HTTP_ALPN),
            roots: n,
        })
    }

    /// A client session to an app at `name` (its host name or IP).
    pub fn session(
        &self,
        mode: appproxy_shared::model::UpstreamTls,
        name: &str,
    ) -> Result<rustls::ClientConnection, rustls::Error> {
        self.session_alpn(mode, name, false)
    }

    /// A client session to an app at `name`, offering `h2` (`h2 = true`) or
    /// `http/1.1`.
    pub fn session_alpn(
        &self,
        mode: appproxy_shared::model::UpstreamTls,
        name: &str,
        h2: bool,
    ) -> Result<rustls::ClientConnection, rustls::Error> {
        let config = match (mode, h2) {
            (appproxy_shared::model::UpstreamTls::Insecure, false) => &self.insecure,
            (appproxy_shared::model::UpstreamTls::Insecure, true) => &self.insecure_h2,
            (_, false) => &self.verify,
            (_, true) => &self.verify_h2,
        };
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| rustls::Error::General(format!("{name:?} is not a host name or IP")))?;
        let mut conn = rustls::ClientConnection::new(config.clone(), name)?;
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(conn)
    }
}

/// Accepts any certificate (the circuit asked for `upstream_tls = "insecure"`); the
/// handshake signatures are still checked, so the session is encrypted to whoever
/// holds the certificate's key.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
