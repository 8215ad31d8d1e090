//! TLS material built from the secrets: the server side of an intercepted session (the
//! secret's certificate chain, or a leaf minted per SNI when the secret's certificate is
//! a CA) and the client side of the session to the real server (the context's CA; the
//! node's roots only with `tls_system_roots`). Built on first use per context and
//! rebuilt when the secrets change. Material that is missing or unusable (a key absent,
//! bad PEM, a private key of another certificate, no CA) is an error naming the secret
//! and the reason: the rule's connections are reset, nothing falls back.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use policy_model::tls::{SecretRef, TlsContext};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use super::secrets::{Secret, SecretStore};
use crate::metrics::Metrics;

/// Validity of a minted leaf; a cached leaf is minted again after half of it.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// A leaf's validity starts this long before it is minted (clocks drift).
const BACKDATE: Duration = Duration::from_secs(3600);

/// ALPN offered to clients of intercepted sessions.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a context's material cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaterialError {
    /// The secret at fault (None: no secret names the material, e.g. no originating
    /// context and no system roots).
    pub secret: Option<SecretRef>,
    pub reason: String,
}

impl fmt::Display for MaterialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The name a minted leaf is for: the client's SNI, or the original destination's IP
/// when the ClientHello has none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(n) => f.write_str(n),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The client side of sessions to real servers: one configuration per upstream
/// protocol (the ALPN offered is the protocol the client chose), and an id that keeps
/// upstream connections of different trust apart in the pools.
#[derive(Debug)]
pub struct Origin {
    pub h1: Arc<ClientConfig>,
    pub h2: Arc<ClientConfig>,
    pub id: u64,
}

/// Settings of the material.
#[derive(Clone, Copy, Debug)]
pub struct MaterialSettings {
    /// Minted leaves kept (least recently used go first).
    pub minted_cache: usize,
    /// An intercepting rule without `originatingTLS` verifies servers against the node's
    /// roots (Ward's extension; Cilium has no such fallback).
    pub system_roots: bool,
}

/// Built material, cached per context until the secrets change.
pub struct Materials {
    secrets: Arc<SecretStore>,
    provider: Arc<CryptoProvider>,
    /// The node's roots, when `system_roots` is set and some could be loaded.
    system_roots: Option<Result<Arc<Origin>, MaterialError>>,
    cache: Mutex<Cache>,
    ids: AtomicU64,
    metrics: Metrics,
}

impl fmt::Debug for Materials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Materials").finish_non_exhaustive()
    }
}

struct Cache {
    /// The secrets' generation the entries were built from.
    generation: u64,
    server: HashMap<TlsContext, Result<ServerSide, MaterialError>>,
    origin: HashMap<TlsContext, Result<Arc<Origin>, MaterialError>>,
    minted: LruCache<(SecretRef, LeafName), (Arc<ServerConfig>, Instant)>,
}

#[derive(Clone)]
enum ServerSide {
    Fixed(Arc<ServerConfig>),
    Minting(Arc<Minter>),
}

impl Materials {
    pub fn new(
        secrets: Arc<SecretStore>,
        settings: MaterialSettings,
        metrics: Metrics,
    ) -> Materials {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut m = Materials {
            secrets,
            provider,
            system_roots: None,
            cache: Mutex::new(Cache {
                generation: 0,
                server: HashMap::new(),
                origin: HashMap::new(),
                minted: LruCache::new(
                    NonZeroUsize::new(settings.minted_cache).unwrap_or(NonZeroUsize::MIN),
                ),
            }),
            ids: AtomicU64::new(1),
            metrics,
        };
        if settings.system_roots {
            m.system_roots = Some(m.load_system_roots());
        }
        m
    }

    pub fn secrets(&self) -> &Arc<SecretStore> {
        &self.secrets
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The server configuration that terminates a session with `ctx`'s certificate, or
    /// with a leaf for `name` minted from `ctx`'s CA (cached, least recently used first
    /// out).
    pub fn server_config(
        &self,
        ctx: &TlsContext,
        name: &LeafName,
    ) -> Result<Arc<ServerConfig>, MaterialError> {
        let side = self.with_cache(|c, secrets| {
            c.server
                .entry(ctx.clone())
                .or_insert_with(|| self.build_server(ctx, secrets))
                .clone()
        })?;
        let minter = match side {
            ServerSide::Fixed(cfg) => return Ok(cfg),
            ServerSide::Minting(m) => m,
        };
        let key = (ctx.secret.clone(), name.clone());
        let cached = self.with_cache(|c, _| c.minted.get(&key).cloned());
        if let Some((cfg, at)) = cached {
            if at.elapsed() < LEAF_VALIDITY / 2 {
                return Ok(cfg);
            }
        }
        let cfg = minter.mint(name).map_err(|e| MaterialError {
            secret: Some(ctx.secret.clone()),
            reason: format!("{ctx}: minting a leaf for {name}: {e}"),
        })?;
        self.metrics.tls_leaves_minted.inc();
        self.with_cache(|c, _| c.minted.put(key, (cfg.clone(), Instant::now())));
        Ok(cfg)
    }

    /// The client side for sessions originated with `ctx` (None: the rule has no
    /// `originatingTLS`; only the node's roots, when allowed, can verify then).
    pub fn origin(&self, ctx: Option<&TlsContext>) -> Result<Arc<Origin>, MaterialError> {
        let Some(ctx) = ctx else {
            return match &self.system_roots {
                Some(r) => r.clone(),
                None => Err(MaterialError {
                    secret: None,
                    reason: "terminatingTLS without originatingTLS: no CA to verify the server with (set tls_system_roots to use the node's roots)".into(),
                }),
            };
        };
        self.with_cache(|c, secrets| {
            c.origin
                .entry(ctx.clone())
                .or_insert_with(|| self.build_origin(ctx, secrets))
                .clone()
        })
    }

    /// Whether `ctx`'s material is usable, building it (the agent's status).
    pub fn check(&self, ctx: &TlsContext) -> Result<(), MaterialError> {
        match ctx.role {
            policy_model::tls::TlsRole::Terminating => self
                .with_cache(|c, secrets| {
                    c.server
                        .entry(ctx.clone())
                        .or_insert_with(|| self.build_server(ctx, secrets))
                        .clone()
                })
                .map(|_| ()),
            policy_model::tls::TlsRole::Originating => self.origin(Some(ctx)).map(|_| ()),
        }
    }

    /// Runs `f` on the cache, emptied first when the secrets changed since it was filled.
    fn with_cache<T>(&self, f: impl FnOnce(&mut Cache, &super::secrets::SecretSet) -> T) -> T {
        let secrets = self.secrets.load();
        let mut c = match self.cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if c.generation != secrets.generation {
            c.generation = secrets.generation;
            c.server.clear();
            c.origin.clear();
            c.minted.clear();
        }
        f(&mut c, &secrets)
    }

    fn secret<'a>(
        &self,
        ctx: &TlsContext,
        secrets: &'a super::secrets::SecretSet,
    ) -> Result<&'a Arc<Secret>, MaterialError> {
        secrets.get(&ctx.secret).ok_or_else(|| MaterialError {
            secret: Some(ctx.secret.clone()),
            reason: format!("{ctx}: secret {} not found", ctx.secret),
        })
    }

    fn build_server(
        &self,
        ctx: &TlsContext,
        secrets: &super::secrets::SecretSet,
    ) -> Result<ServerSide, MaterialError> {
        let fail = |reason: String| MaterialError {
            secret: Some(ctx.secret.clone()),
            reason: format!("{ctx}: {reason}"),
        };
        let secret = self.secret(ctx, secrets)?;
        let chain = certificates(secret, ctx.cert_key(), "certificate").map_err(fail)?;
        let key_bytes = key_of(secret, ctx.private_key_key(), "private key").map_err(fail)?;
        let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|e| {
            fail(format!(
                "{}: no usable PEM private key ({e})",
                ctx.private_key_key()
            ))
        })?;
        let signer = self
            .provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| fail(format!("{}: {e}", ctx.private_key_key())))?;
        let certified = CertifiedKey::new(chain.clone(), signer.clone());
        certified.keys_match().map_err(|e| {
            fail(format!(
                "the private key in {} does not belong to the certificate in {} ({e})",
                ctx.private_key_key(),
                ctx.cert_key()
            ))
        })?;
        let first = chain
            .first()
            .ok_or_else(|| fail(format!("{}: no certificate", ctx.cert_key())))?;
        if is_ca(first).map_err(|e| fail(format!("{}: {e}", ctx.cert_key())))? {
            let minter = Minter::new(first, signer, &self.provider)
                .map_err(|e| fail(format!("{}: a CA that cannot sign: {e}", ctx.cert_key())))?;
            return Ok(ServerSide::Minting(Arc::new(minter)));
        }
        server_config(&self.provider, Arc::new(certified))
            .map(ServerSide::Fixed)
            .map_err(fail)
    }

    fn build_origin(
        &self,
        ctx: &TlsContext,
        secrets: &super::secrets::SecretSet,
    ) -> Result<Arc<Origin>, MaterialError> {
        let fail = |reason: String| MaterialError {
            secret: Some(ctx.secret.clone()),
            reason: format!("{ctx}: {reason}"),
        };
        let secret = self.secret(ctx, secrets)?;
        let cas = certificates(secret, ctx.ca_key(), "trusted CA").map_err(fail)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in cas.into_iter().enumerate() {
            roots.add(c).map_err(|e| {
                fail(format!(
                    "{}: certificate {} is not a usable trust anchor ({e})",
                    ctx.ca_key(),
                    i + 1
                ))
            })?;
        }
        self.origin_with(roots).map_err(fail)
    }

    fn origin_with(&self, roots: RootCertStore) -> Result<Arc<Origin>, String> {
        let base = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut h1 = base.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = base;
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(Origin {
            h1: Arc::new(h1),
            h2: Arc::new(h2),
            id: self.ids.fetch_add(1, Ordering::Relaxed),
        }))
    }

    fn load_system_roots(&self) -> Result<Arc<Origin>, MaterialError> {
        let fail = |reason: String| MaterialError {
            secret: None,
            reason: format!("tls_system_roots: {reason}"),
        };
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!("tls_system_roots: {e}");
        }
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(fail("no usable root certificate on this node".into()));
        }
        tracing::info!("tls_system_roots: {added} root certificates of the node");
        self.origin_with(roots).map_err(fail)
    }
}

fn key_of<'a>(secret: &'a Secret, key: &str, what: &str) -> Result<&'a [u8], String> {
    secret
        .get(key)
        .ok_or_else(|| format!("the secret has no {key} ({what})"))
}

/// The PEM certificates of one key of a secret (at least one).
fn certificates(
    secret: &Secret,
    key: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = key_of(secret, key, what)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: bad PEM ({e})"))?;
    if certs.is_empty() {
        return Err(format!("{key}: no PEM certificate"));
    }
    Ok(certs)
}

/// Whether a certificate is a CA (basicConstraints CA:TRUE).
fn is_ca(der: &CertificateDer<'_>) -> Result<bool, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("bad basicConstraints ({e})"))?;
    Ok(bc.is_some_and(|b| b.value.ca))
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, String> {
    let mut c = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    c.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

/// A CA secret's key, as rcgen signs with it: any key rustls loads (PKCS#8, PKCS#1,
/// SEC1: what cert-manager writes), with the public key of the CA certificate.
struct CaKey {
    signer: Arc<dyn rustls::sign::SigningKey>,
    scheme: SignatureScheme,
    algorithm: &'static SignatureAlgorithm,
    public: Vec<u8>,
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signer = self
            .signer
            .choose_scheme(&[self.scheme])
            .ok_or(rcgen::Error::RemoteKeyError)?;
        signer.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Mints leaves signed by a CA secret. Every leaf of one CA shares one key pair,
/// generated when the CA is loaded; it never leaves the proxy.
struct Minter {
    issuer: Issuer<'static, CaKey>,
    ca: CertificateDer<'static>,
    ca_not_after: time::OffsetDateTime,
    leaf_key: KeyPair,
    provider: Arc<CryptoProvider>,
    serial: AtomicU64,
}

impl Minter {
    fn new(
        ca: &CertificateDer<'_>,
        signer: Arc<dyn rustls::sign::SigningKey>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Minter, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(ca)
            .map_err(|e| format!("not an X.509 certificate ({e})"))?;
        let public = cert.public_key().subject_public_key.data.to_vec();
        let ca_not_after = cert.validity().not_after.to_datetime();
        let (scheme, algorithm) = [
            (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            (SignatureScheme::ED25519, &rcgen::PKCS_ED25519),
            (SignatureScheme::RSA_PKCS1_SHA256, &rcgen::PKCS_RSA_SHA256),
        ]
        .into_iter()
        .find(|(s, _)| signer.choose_scheme(&[*s]).is_some())
        .ok_or("the key signs with none of ECDSA P-256/P-384, Ed25519, RSA")?;
        let key = CaKey {
            signer,
            scheme,
            algorithm,
            public,
        };
        let issuer = Issuer::from_ca_cert_der(ca, key).map_err(|e| e.to_string())?;
        let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
        Ok(Minter {
            issuer,
            ca: ca.clone().into_owned(),
            ca_not_after,
            leaf_key,
            provider: provider.clone(),
            serial: AtomicU64::new(0),
        })
    }

    fn mint(&self, name: &LeafName) -> Result<Arc<ServerConfig>, String> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(n) => SanType::DnsName(n.clone().try_into().map_err(|e| format!("{e}"))?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.ca_not_after);
        if params.not_after <= now {
            return Err("the CA certificate has expired".into());
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(self.serial_number());
        let leaf = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let key =
            PrivateKeyDer::try_from(self.leaf_key.serialize_der()).map_err(|e| e.to_string())?;
        let signer = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| e.to_string())?;
        let chain = vec![leaf.der().clone(), self.ca.clone()];
        server_config(&self.provider, Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// Unique per leaf: the time of minting and a counter.
    fn serial_number(&self) -> SerialNumber {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(17);
        // positive: a leading 0x01 keeps the DER integer's sign bit clear
        bytes.push(1);
        bytes.extend_from_slice(&nanos.to_be_bytes());
        bytes.extend_from_slice(&n.to_be_bytes());
        SerialNumber::from_slice(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use policy_model::tls::TlsRole;
    use rcgen::{BasicConstraints, CertifiedIssuer};

    use super::*;

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(name: &str, issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn ctx(role: TlsRole, name: &str) -> TlsContext {
        TlsContext {
            role,
            secret: SecretRef {
                namespace: "ns".into(),
                name: name.into(),
            },
            trusted_ca: None,
            certificate: None,
            private_key: None,
        }
    }

    fn materials(secrets: Vec<(&str, Vec<(&str, String)>)>) -> Materials {
        let store = Arc::new(SecretStore::new());
        store.publish(
            secrets
                .into_iter()
                .map(|(n, keys)| {
                    (
                        SecretRef {
                            namespace: "ns".into(),
                            name: n.into(),
                        },
                        keys.into_iter()
                            .map(|(k, v)| (k.to_string(), v.into_bytes()))
                            .collect::<BTreeMap<_, _>>(),
                    )
                })
                .collect(),
        );
        Materials::new(
            store,
            MaterialSettings {
                minted_cache: 2,
                system_roots: false,
            },
            Metrics::new(),
        )
    }

    fn err(r: Result<impl Sized, MaterialError>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                assert!(e.secret.is_some(), "{e}");
                e.reason
            }
        }
    }

    /// Every kind of bad material is an error naming the secret and the key.
    #[test]
    fn bad_material_says_what_is_wrong() {
        let a = ca("A");
        let b = ca("B");
        let (cert, key) = leaf("api.example", &a);
        let (_, other_key) = leaf("api.example", &b);
        let m = materials(vec![
            ("no-key", vec![("tls.crt", cert.clone())]),
            (
                "bad-pem",
                vec![("tls.crt", "garbage".into()), ("tls.key", key.clone())],
            ),
            (
                "not-a-key",
                vec![("tls.crt", cert.clone()), ("tls.key", cert.clone())],
            ),
            (
                "mismatch",
                vec![("tls.crt", cert.clone()), ("tls.key", other_key)],
            ),
            ("no-ca", vec![("tls.crt", cert.clone())]),
            (
                "bad-ca",
                vec![(
                    "ca.crt",
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                )],
            ),
        ]);
        let name = LeafName::Dns("api.example".into());
        let t = |n| m.server_config(&ctx(TlsRole::Terminating, n), &name);
        assert!(err(t("gone")).ends_with("secret ns/gone not found"));
        assert!(err(t("no-key")).ends_with("the secret has no tls.key (private key)"));
        assert!(err(t("bad-pem")).contains("tls.crt: no PEM certificate"));
        assert!(err(t("not-a-key")).contains("tls.key: no usable PEM private key"));
        assert!(err(t("mismatch")).contains("does not belong to the certificate in tls.crt"));
        let o = |n| m.origin(Some(&ctx(TlsRole::Originating, n)));
        assert!(err(o("no-ca")).ends_with("the secret has no ca.crt (trusted CA)"));
        assert!(err(o("bad-ca")).contains("ca.crt"));
        let e = m.origin(None).unwrap_err();
        assert!(e.reason.contains("tls_system_roots"), "{e}");
        assert_eq!(e.secret, None);
    }

    /// A CA secret mints a leaf per name, signed by it, kept in a bounded cache.
    #[test]
    fn a_ca_secret_mints_leaves_per_name() {
        let a = ca("Interception CA");
        let m = materials(vec![(
            "ca",
            vec![("tls.crt", a.pem()), ("tls.key", a.key().serialize_pem())],
        )]);
        let c = ctx(TlsRole::Terminating, "ca");
        let x = LeafName::Dns("x.example".into());
        let one = m.server_config(&c, &x).unwrap();
        assert!(
            Arc::ptr_eq(&one, &m.server_config(&c, &x).unwrap()),
            "cached"
        );
        m.server_config(&c, &LeafName::Dns("y.example".into()))
            .unwrap();
        m.server_config(&c, &LeafName::Ip("192.0.2.1".parse().unwrap()))
            .unwrap();
        assert_eq!(m.metrics.tls_leaves_minted.get(), 3);
        // the cache holds two: x.example was the least recently used and went
        let again = m.server_config(&c, &x).unwrap();
        assert!(!Arc::ptr_eq(&one, &again));
        assert_eq!(m.metrics.tls_leaves_minted.get(), 4);
    }
}
