//! The lab's TLS material (conformance format, TLS additions): a "public" CA that signs
//! the certificates of the servers that serve TLS (externals and pods with `tls:`), an
//! interception CA for the secrets the policies name (`cluster.secrets` with
//! `generate:`), the secrets as the agents read them (`--certificates-dir`, layout
//! `DIR/NAMESPACE/NAME/KEY`), and the bundle the probe clients trust (both CAs).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use policy_model::cluster::{Cluster, Generate, Secret};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

type Ca = CertifiedIssuer<'static, KeyPair>;

/// The run directory's TLS layout.
pub struct Layout {
    /// Secrets for the agents: `certs/NAMESPACE/NAME/KEY`.
    pub certificates_dir: PathBuf,
    /// What the probe clients trust: the public and the interception CA.
    pub client_bundle: PathBuf,
}

impl Layout {
    pub fn of(run_dir: &Path) -> Layout {
        Layout {
            certificates_dir: run_dir.join("certs"),
            client_bundle: run_dir.join("tls").join("clients-ca.pem"),
        }
    }
}

/// A server's certificate and key files.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the two CAs, every secret of `cluster` in the certificates directory, the
/// client bundle, and one server certificate per namespace in `servers` (namespace ->
/// the names its TLS servers answer for). Returns the server certificates by namespace.
pub fn build(
    run_dir: &Path,
    cluster: &Cluster,
    servers: &BTreeMap<String, BTreeSet<String>>,
) -> Result<BTreeMap<String, ServerCert>> {
    let layout = Layout::of(run_dir);
    let tls_dir = run_dir.join("tls");
    fs::create_dir_all(&tls_dir).with_context(|| format!("cannot create {}", tls_dir.display()))?;
    fs::create_dir_all(&layout.certificates_dir)
        .with_context(|| format!("cannot create {}", layout.certificates_dir.display()))?;
    let public = ca("ward-lab public CA")?;
    let intercept = ca("ward-lab interception CA")?;
    write(
        &layout.client_bundle,
        &format!("{}{}", public.pem(), intercept.pem()),
    )?;
    for s in &cluster.secrets {
        write_secret(&layout.certificates_dir, s, &public, &intercept)
            .with_context(|| format!("cluster.secrets {}/{}", s.namespace, s.name))?;
    }
    let mut out = BTreeMap::new();
    for (ns, names) in servers {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (cert, key) = leaf(&names, &public)?;
        let files = ServerCert {
            cert: tls_dir.join(format!("{ns}.crt")),
            key: tls_dir.join(format!("{ns}.key")),
        };
        write(&files.cert, &cert)?;
        write(&files.key, &key)?;
        out.insert(ns.clone(), files);
    }
    Ok(out)
}

fn ca(name: &str) -> Result<Ca> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(CertifiedIssuer::self_signed(p, KeyPair::generate()?)?)
}

/// A server certificate for `names` signed by `issuer`: (cert PEM, key PEM).
fn leaf(names: &[&str], issuer: &Ca) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .with_context(|| format!("certificate names {names:?}"))?;
    if let Some(first) = names.first() {
        p.distinguished_name.push(DnType::CommonName, *first);
    }
    Ok((p.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// One secret's files, as `generate` says; a secret without `generate` gets no files
/// (the agents see it missing, as a case without material means).
fn write_secret(dir: &Path, s: &Secret, public: &Ca, intercept: &Ca) -> Result<()> {
    let Some(generate) = s.generate else {
        return Ok(());
    };
    let key_or = |i: usize, default: &'static str| -> String {
        s.keys
            .get(i)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let files: Vec<(String, String)> = match generate {
        Generate::Ca => vec![
            (key_or(0, "tls.crt"), intercept.pem()),
            (key_or(1, "tls.key"), intercept.key().serialize_pem()),
        ],
        Generate::Leaf => {
            if s.names.is_empty() {
                bail!("generate: leaf needs names");
            }
            let names: Vec<&str> = s.names.iter().map(String::as_str).collect();
            let (cert, key) = leaf(&names, intercept)?;
            vec![(key_or(0, "tls.crt"), cert), (key_or(1, "tls.key"), key)]
        }
        Generate::Trust => vec![(key_or(0, "ca.crt"), public.pem())],
        Generate::Value => {
            let Some(v) = &s.value else {
                bail!("generate: value needs value");
            };
            vec![(key_or(0, "value"), v.clone())]
        }
    };
    let secret_dir = dir.join(&s.namespace).join(&s.name);
    fs::create_dir_all(&secret_dir)
        .with_context(|| format!("cannot create {}", secret_dir.display()))?;
    for (key, content) in files {
        write(&secret_dir.join(key), &content)?;
    }
    Ok(())
}

fn write(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn secrets_and_server_certificates_are_written_as_generate_says() {
        let dir = std::env::temp_dir().join(format!("ward-lab-pki-{}", std::process::id()));
        let cluster: Cluster = serde_yaml::from_str(
            "namespaces: [{name: x}]
pods: []
secrets:
- {namespace: k, name: mint, keys: [tls.crt, tls.key], generate: ca}
- {namespace: k, name: leaf, keys: [tls.crt, tls.key], generate: leaf, names: [a.example]}
- {namespace: k, name: trust, keys: [ca.crt], generate: trust}
- {namespace: x, name: token, keys: [value], generate: value, value: s3cr3t}
- {namespace: x, name: described-only, keys: [tls.crt, tls.key]}
",
        )
        .unwrap();
        let mut servers = BTreeMap::new();
        servers.insert(
            "world".to_string(),
            BTreeSet::from(["a.example".to_string()]),
        );
        let certs = build(&dir, &cluster, &servers).unwrap();
        let certs_dir = Layout::of(&dir).certificates_dir;
        let read = |p: &str| fs::read_to_string(certs_dir.join(p)).unwrap();
        assert!(read("k/mint/tls.crt").contains("BEGIN CERTIFICATE"));
        assert!(read("k/mint/tls.key").contains("PRIVATE KEY"));
        assert!(read("k/leaf/tls.crt").contains("BEGIN CERTIFICATE"));
        assert_ne!(read("k/leaf/tls.crt"), read("k/mint/tls.crt"));
        assert_eq!(read("x/token/value"), "s3cr3t");
        assert!(!certs_dir.join("x/described-only").exists());
        // the trust secret is the CA of the servers' certificates, and the clients trust it
        let bundle = fs::read_to_string(Layout::of(&dir).client_bundle).unwrap();
        assert!(bundle.starts_with(&read("k/trust/ca.crt")));
        assert!(bundle.ends_with(&read("k/mint/tls.crt")));
        assert!(fs::read_to_string(&certs["world"].cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
