//! The settings of `ward agent`: its command line and its config file. Every option
//! can be set in a YAML file (`--config`, keys as the long flags with `_` for `-`);
//! flags override the file; defaults apply to what neither sets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Settings;
use crate::secrets::{self, SecretSource};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// YAML config file; flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Network namespace to run in (a name under /var/run/netns, or a path), entered at
    /// start. Unlike `ip netns exec`, this keeps the host's /sys/fs/bpf in view, so pins
    /// under the default bpffs survive the process.
    #[arg(long)]
    pub netns: Option<String>,
    /// This node's name: its pods (`node:` in cluster state) are enforced here.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Where cluster state and policies come from: `files` (--source-dir) or `kubernetes`
    /// (the API server, in-cluster service account or KUBECONFIG) [default: files].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Directory of YAML files: cluster state (conformance `cluster:` shape) and policy
    /// manifests, read recursively and watched for changes.
    #[arg(long)]
    source_dir: Option<PathBuf>,
    /// How often the source directory is re-read in full, in milliseconds, as a safety
    /// net behind the change notifications (inotify); at least 1000 [default: 30000].
    #[arg(long)]
    source_poll_ms: Option<u64>,
    /// How often local pods whose interface is not found yet are looked for again, in
    /// milliseconds, when no route or link change in the node's namespace (watched over
    /// netlink) prompted a look [default: 10000].
    #[arg(long)]
    endpoint_recheck_ms: Option<u64>,
    /// bpffs directory of the pinned maps and links [default: /sys/fs/bpf/ward].
    #[arg(long)]
    bpf_root: Option<PathBuf>,
    /// Capacity of the policy map: entries (local endpoint, peer identity, direction,
    /// protocol, port block) over all local endpoints, allocated as they are written
    /// (Cilium's bpf-policy-map-max is per endpoint). A new size replaces the pinned
    /// map at start with its entries [default: 1048576; 1024 to 16777216].
    #[arg(long)]
    policy_map_max: Option<u32>,
    /// State directory: DNS cache (`dns/`), learned FQDN observations, identity numbers
    /// [default: /var/lib/ward].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Admin HTTP endpoint: /metrics, /healthz, /readyz, /v1/... [default: 127.0.0.1:9890].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// File holding the admin endpoint's token (surrounding whitespace trimmed): with it,
    /// /v1/* and /ui/* need `Authorization: Bearer TOKEN` (or the browser's cookie, set by
    /// opening /ui/?token=TOKEN); /healthz, /readyz and /metrics stay open. Read at start:
    /// a new token needs a restart. An empty or unreadable file stops the start.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// After a new agent took over this one's sockets (a planned restart), how long this
    /// one lets its HTTP connections finish before it stops, in milliseconds
    /// [default: 30000].
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Port of the transparent HTTP proxy (all addresses) [default: 15001].
    #[arg(long)]
    proxy_port: Option<u16>,
    /// Port of the transparent DNS proxy, UDP and TCP [default: 15053].
    #[arg(long)]
    dns_proxy_port: Option<u16>,
    /// Uplink interface whose ingress carries traffic for local pods (repeatable; the
    /// config file key is `uplinks`).
    #[arg(long = "uplink")]
    uplinks: Vec<String>,
    /// Audit log of both proxies (JSON lines): a file, `-` for stdout, or `none` [default: -].
    #[arg(long)]
    audit_log: Option<String>,
    /// Upstream connections of the HTTP proxy leave from the node's address instead of
    /// the client's (transparent source is the default in agent mode).
    #[arg(long)]
    no_transparent_source: bool,
    /// CIDR selectors (ipBlock, toCIDR, ANP networks) also match pod and node IPs, as the
    /// Kubernetes NetworkPolicy conformance tests expect. Off by default, as in Cilium,
    /// where a pod is selected by its labels only.
    #[arg(long)]
    cidr_matches_cluster: bool,
    /// TLS secrets of policies (terminatingTLS, originatingTLS, headerMatches secrets) as
    /// files DIR/NAMESPACE/NAME/KEY, watched [default with the files source:
    /// /var/run/ward/certs; the Kubernetes source reads Secrets instead unless this is set].
    #[arg(long)]
    certificates_dir: Option<PathBuf>,
    /// With the Kubernetes source: the one namespace whose Secrets the agent reads for
    /// policies [default: ward-secrets].
    #[arg(long)]
    policy_secrets_namespace: Option<String>,
}

/// Where the agent learns cluster state and policies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A directory of YAML files (`--source-dir`), watched.
    #[default]
    Files,
    /// The Kubernetes API server (kube-rs watchers), as a DaemonSet runs it.
    Kubernetes,
}

/// The config file: the same keys as the flags, plus the proxies' own settings.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct File {
    node: Option<String>,
    source: Option<SourceKind>,
    source_dir: Option<PathBuf>,
    source_poll_ms: Option<u64>,
    endpoint_recheck_ms: Option<u64>,
    policy_map_max: Option<u32>,
    bpf_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    admin: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
    drain_timeout_ms: Option<u64>,
    proxy_port: Option<u16>,
    dns_proxy_port: Option<u16>,
    uplinks: Vec<String>,
    audit_log: Option<String>,
    transparent_source: Option<bool>,
    cidr_matches_cluster: Option<bool>,
    certificates_dir: Option<PathBuf>,
    policy_secrets_namespace: Option<String>,
    /// HTTP proxy settings (timeouts, limits), keys as in proxy/README.md.
    proxy: Option<proxy::Config>,
    /// DNS proxy settings, keys as in dns-proxy/README.md.
    dns_proxy: Option<dns_proxy::Config>,
}

/// Why the settings are not usable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Parse {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    AdminToken(#[from] crate::admin::auth::TokenError),
}

/// The smallest policy map the agent accepts: one endpoint's worth of a few policies.
const POLICY_MAP_MIN: u32 = 1024;
/// The largest: 16 Mi entries, some GiB of kernel memory when full.
const POLICY_MAP_LIMIT: u32 = 1 << 24;

fn read_file(path: &Path) -> Result<File, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let de = serde_yaml::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}

/// Merges flags over the file over the defaults.
pub fn settings(a: Args) -> Result<Settings, Error> {
    let f = match &a.config {
        Some(p) => read_file(p)?,
        None => File::default(),
    };
    let Some(node) = a.node.or(f.node) else {
        return Err(Error::Missing(
            "--node (or NODE_NAME, or `node:` in --config)",
        ));
    };
    let source = a.source.or(f.source).unwrap_or_default();
    let source_dir = a.source_dir.or(f.source_dir);
    if source == SourceKind::Files && source_dir.is_none() {
        return Err(Error::Missing(
            "--source-dir (or `source_dir:` in --config) with the files source",
        ));
    }
    let secrets = match (a.certificates_dir.or(f.certificates_dir), source) {
        (Some(dir), _) => SecretSource::Dir(dir),
        (None, SourceKind::Files) => SecretSource::Dir(PathBuf::from(secrets::DEFAULT_DIR)),
        (None, SourceKind::Kubernetes) => SecretSource::Kubernetes {
            namespace: a
                .policy_secrets_namespace
                .or(f.policy_secrets_namespace)
                .unwrap_or_else(|| secrets::DEFAULT_NAMESPACE.into()),
        },
    };
    let admin_token = match a.admin_token_file.or(f.admin_token_file) {
        Some(path) => Some(crate::admin::auth::Token::read(&path)?),
        None => None,
    };
    let policy_map_max = a
        .policy_map_max
        .or(f.policy_map_max)
        .unwrap_or(redirect_bpf::common::POLICY_MAX);
    if !(POLICY_MAP_MIN..=POLICY_MAP_LIMIT).contains(&policy_map_max) {
        return Err(Error::Invalid {
            field: "policy_map_max",
            reason: format!(
                "{policy_map_max} is out of range ({POLICY_MAP_MIN} to {POLICY_MAP_LIMIT})"
            ),
        });
    }
    Ok(Settings {
        node,
        source,
        source_dir,
        policy_map_max,
        rescan: a
            .source_poll_ms
            .or(f.source_poll_ms)
            .map_or(crate::source::files::DEFAULT_RESCAN, Duration::from_millis),
        endpoint_recheck: a.endpoint_recheck_ms.or(f.endpoint_recheck_ms).map_or(
            crate::reconcile::attacher::ENDPOINT_RECHECK,
            Duration::from_millis,
        ),
        bpf_root: a
            .bpf_root
            .or(f.bpf_root)
            .unwrap_or_else(|| PathBuf::from(redirect_bpf::DEFAULT_ROOT)),
        state_dir: a
            .state_dir
            .or(f.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/ward")),
        admin: a
            .admin
            .or(f.admin)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9890))),
        admin_token,
        drain: a
            .drain_timeout_ms
            .or(f.drain_timeout_ms)
            .map_or(super::DRAIN, Duration::from_millis),
        proxy_port: a.proxy_port.or(f.proxy_port).unwrap_or(15001),
        dns_proxy_port: a.dns_proxy_port.or(f.dns_proxy_port).unwrap_or(15053),
        uplinks: if a.uplinks.is_empty() {
            f.uplinks
        } else {
            a.uplinks
        },
        audit_log: a.audit_log.or(f.audit_log).unwrap_or_else(|| "-".into()),
        transparent_source: !a.no_transparent_source && f.transparent_source.unwrap_or(true),
        proxy: f.proxy.unwrap_or_default(),
        dns: f.dns_proxy.unwrap_or_default(),
        compile: policy_model::CompileOptions {
            cidr_matches_cluster: a.cidr_matches_cluster || f.cidr_matches_cluster.unwrap_or(false),
        },
        secrets,
    })
}

/// Whether the admin endpoint serves flows and policies to anyone who reaches `admin`:
/// bound beyond loopback, without a token.
pub fn admin_exposed(admin: SocketAddr, token: Option<&crate::admin::auth::Token>) -> bool {
    token.is_none() && !admin.ip().is_loopback()
}

/// Warns when [`admin_exposed`]: existing set-ups keep working, but the log says what
/// anyone on the network can read.
pub fn warn_exposed_admin(admin: SocketAddr, token: Option<&crate::admin::auth::Token>) {
    if admin_exposed(admin, token) {
        tracing::warn!(
            %admin,
            "the admin endpoint listens beyond loopback without a token: /v1 and /ui \
             (flows, policies) are unauthenticated; set --admin-token-file"
        );
    }
}

/// Pins under /sys/fs/bpf survive the agent only on the host's bpffs. Under `ip netns
/// exec`, /sys is remounted without it, and the loader would mount a bpffs private to
/// this process: say so, since a restart would then start from empty maps.
pub fn warn_private_bpffs(root: &Path) {
    if !root.starts_with("/sys/fs/bpf") {
        return;
    }
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    });
    if !mounted {
        tracing::warn!(
            "no bpffs on /sys/fs/bpf in this mount namespace (ip netns exec?): the pins would \
             not outlive this process; use --netns NAME instead, or a --bpf-root on a bpffs \
             mounted outside /sys"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(
            &cfg,
            "node: n1\nsource_dir: /src\nproxy_port: 1000\nuplinks: [up0]\nendpoint_recheck_ms: 2500\nproxy: {idle_timeout_ms: 5}\n",
        )
        .unwrap();
        let s = settings(Args {
            config: Some(cfg.clone()),
            proxy_port: Some(2000),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(s.node, "n1");
        assert_eq!(s.proxy_port, 2000, "flag wins");
        assert_eq!(s.dns_proxy_port, 15053, "default");
        assert_eq!(s.uplinks, vec!["up0".to_string()]);
        assert_eq!(s.proxy.idle_timeout_ms, 5);
        assert!(s.transparent_source);
        assert_eq!(s.bpf_root, PathBuf::from("/sys/fs/bpf/ward"));
        assert_eq!(s.endpoint_recheck, Duration::from_millis(2500));
        assert_eq!(s.secrets, SecretSource::Dir("/var/run/ward/certs".into()));

        std::fs::write(&cfg, "node: n1\nsource_dir: /src\nproxy_prot: 1\n").unwrap();
        let e = settings(Args {
            config: Some(cfg),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("proxy_prot"), "{e}");
    }

    #[test]
    fn the_kubernetes_source_needs_no_directory_and_the_deploy_config_parses() {
        // the ConfigMap the DaemonSet mounts must be a valid agent config
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configmap.yaml"),
        )
        .unwrap();
        let cm: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let inner = cm["data"]["config.yaml"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.yaml");
        // the token file is where the DaemonSet mounts the Secret ward-admin-token; here a
        // file of the test's own stands in for it
        let mounted = "admin_token_file: /etc/ward-admin/token\n";
        assert!(inner.contains(mounted), "{inner}");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken").unwrap();
        let inner = inner.replace(mounted, &format!("admin_token_file: {}\n", token.display()));
        std::fs::write(&cfg, inner).unwrap();
        let s = settings(Args {
            config: Some(cfg),
            node: Some("n1".into()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(s.source, SourceKind::Kubernetes);
        assert_eq!(s.source_dir, None);
        assert_eq!(s.admin.port(), 9890);
        assert_eq!(
            s.admin_token.map(|t| t.as_str().to_string()).as_deref(),
            Some("t0ken")
        );
        assert_eq!(
            s.secrets,
            SecretSource::Kubernetes {
                namespace: "ward-secrets".into()
            }
        );

        let e = settings(Args {
            node: Some("n1".into()),
            source: Some(SourceKind::Files),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--source-dir"), "{e}");
    }

    /// Where TLS secrets come from: a certificates directory (given, or the files
    /// source's default), else the Kubernetes source's one namespace.
    #[test]
    fn tls_secrets_come_from_a_directory_or_one_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(
            &cfg,
            "node: n1\nsource: kubernetes\npolicy_secrets_namespace: tls-material\n",
        )
        .unwrap();
        let with = |a: Args| settings(a).unwrap().secrets;
        assert_eq!(
            with(Args {
                config: Some(cfg.clone()),
                ..Args::default()
            }),
            SecretSource::Kubernetes {
                namespace: "tls-material".into()
            }
        );
        assert_eq!(
            with(Args {
                config: Some(cfg.clone()),
                policy_secrets_namespace: Some("flag-wins".into()),
                ..Args::default()
            }),
            SecretSource::Kubernetes {
                namespace: "flag-wins".into()
            }
        );
        assert_eq!(
            with(Args {
                config: Some(cfg),
                certificates_dir: Some("/etc/ward/certs".into()),
                ..Args::default()
            }),
            SecretSource::Dir("/etc/ward/certs".into()),
            "a certificates directory is read instead of the API"
        );
    }

    /// The policy map's capacity: the default, the file's, the flag's; out of range is an
    /// error that names the setting.
    #[test]
    fn the_policy_map_size_is_a_setting_with_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(&cfg, "node: n1\nsource_dir: /src\n").unwrap();
        let args = |flag: Option<u32>| Args {
            config: Some(cfg.clone()),
            policy_map_max: flag,
            ..Args::default()
        };
        assert_eq!(
            settings(args(None)).unwrap().policy_map_max,
            redirect_bpf::common::POLICY_MAX
        );
        std::fs::write(&cfg, "node: n1\nsource_dir: /src\npolicy_map_max: 4096\n").unwrap();
        assert_eq!(settings(args(None)).unwrap().policy_map_max, 4096);
        assert_eq!(settings(args(Some(8192))).unwrap().policy_map_max, 8192);
        for bad in [0, 1023, (1 << 24) + 1] {
            let e = settings(args(Some(bad))).unwrap_err().to_string();
            assert!(
                e.starts_with("policy_map_max: ") && e.contains("out of range"),
                "{e}"
            );
        }
    }

    /// `admin_token_file` in the file or the flag: the token read at start; an empty or
    /// missing file stops the start naming the file; beyond loopback without a token is
    /// what the start-up warning is for.
    #[test]
    fn the_admin_token_comes_from_a_file_named_by_the_flag_or_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "from-file\n").unwrap();
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(
            &cfg,
            format!(
                "node: n1\nsource_dir: /src\nadmin: 0.0.0.0:9890\nadmin_token_file: {}\n",
                token.display()
            ),
        )
        .unwrap();
        let args = |flag: Option<PathBuf>| Args {
            config: Some(cfg.clone()),
            admin_token_file: flag,
            ..Args::default()
        };
        let s = settings(args(None)).unwrap();
        assert_eq!(
            s.admin_token.as_ref().map(|t| t.as_str()),
            Some("from-file")
        );
        assert!(!admin_exposed(s.admin, s.admin_token.as_ref()));
        assert!(admin_exposed(s.admin, None), "0.0.0.0 without a token");
        assert!(!admin_exposed("127.0.0.1:9890".parse().unwrap(), None));
        assert!(!admin_exposed("[::1]:9890".parse().unwrap(), None));

        let other = dir.path().join("other");
        std::fs::write(&other, "from-flag").unwrap();
        let s = settings(args(Some(other))).unwrap();
        assert_eq!(s.admin_token.unwrap().as_str(), "from-flag", "flag wins");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = settings(args(Some(empty.clone()))).unwrap_err().to_string();
        assert!(
            e.contains(&empty.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        let gone = dir.path().join("gone");
        let e = settings(args(Some(gone.clone()))).unwrap_err().to_string();
        assert!(e.contains(&gone.display().to_string()), "{e}");

        std::fs::write(&cfg, "node: n1\nsource_dir: /src\n").unwrap();
        assert!(settings(args(None)).unwrap().admin_token.is_none());
    }
}
