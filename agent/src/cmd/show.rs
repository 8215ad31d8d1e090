//! `ward policy show`: what the policies say about pods, as np-viewer lists it, from
//! files or from a running agent. The meaning (which policies select a pod, isolation,
//! rules in evaluation order) is policy-model's (`policy_model::show`); this renders it
//! as text, JSON or a graph of the allowed peers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use agent::admin::auth::Token;
use agent::admin::client::{token_from, Client};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use policy_model::show::{DirectionView, EndpointView, LabelQuery, RuleView, Selection};
use policy_model::{CompileOptions, Direction};

use crate::inputs::compile_model;

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The pod: NAMESPACE/POD, or POD in --namespace. Without it: the pods of the
    /// namespace that -l selects.
    pod: Option<String>,
    /// The namespace (default: `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Pods of every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// A label selector as kubectl takes it (`app=api`, `tier in (web,backend)`, `!canary`).
    #[arg(short = 'l', long, conflicts_with = "pod")]
    selector: Option<String>,
    /// Cluster state: the `cluster:` shape of a conformance case, or a whole case file.
    #[arg(long, requires = "policies", conflicts_with = "admin")]
    cluster: Option<PathBuf>,
    /// Policy manifests (files or folders; case files contribute their policies).
    #[arg(long, num_args = 1.., requires = "cluster")]
    policies: Vec<PathBuf>,
    /// Ask a running agent instead (its admin address; the policy it enforces).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Network namespace of that agent (name under /var/run/netns, or a path); implies
    /// --admin 127.0.0.1:9890 when --admin is not given.
    #[arg(long, value_name = "NETNS", conflicts_with = "cluster")]
    netns: Option<String>,
    /// File holding that agent's admin token (its --admin-token-file), sent as
    /// `Authorization: Bearer`.
    #[arg(long, value_name = "FILE", env = "WARD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Let CIDR rules match pod and node IPs (Kubernetes' expectation; Cilium's default is not to).
    #[arg(long)]
    cidr_matches_cluster: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Instead of the listing: the pods and the peers their rules allow, as Graphviz DOT,
    /// or as SVG (drawn by graphviz's `dot`).
    #[arg(long, value_enum)]
    graph: Option<Graph>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Graph {
    Dot,
    Svg,
}

impl ShowArgs {
    /// The pods the flags select.
    pub fn selection(&self) -> Result<Selection> {
        let namespace = self.namespace.clone().unwrap_or_else(|| "default".into());
        if let Some(p) = &self.pod {
            let pod = if p.contains('/') {
                p.clone()
            } else {
                format!("{namespace}/{p}")
            };
            if pod.split('/').count() != 2 || pod.split('/').any(str::is_empty) {
                bail!("{p:?}: expected NAMESPACE/POD or POD");
            }
            return Ok(Selection {
                pod: Some(pod),
                ..Selection::default()
            });
        }
        Ok(Selection {
            pod: None,
            namespace: (!self.all_namespaces).then_some(namespace),
            labels: LabelQuery::parse(self.selector.as_deref().unwrap_or(""))
                .context("-l/--selector")?,
        })
    }
}

pub fn run(a: ShowArgs) -> Result<ExitCode> {
    let sel = a.selection()?;
    let views = match (&a.cluster, a.admin, &a.netns) {
        (Some(cluster), _, _) => {
            let model = compile_model(
                cluster,
                &a.policies,
                CompileOptions {
                    cidr_matches_cluster: a.cidr_matches_cluster,
                },
            )?;
            model.show_selection(&sel)?
        }
        (None, None, None) => {
            bail!("say where the policies are: --cluster FILE --policies PATH..., or a running agent's --admin ADDR (and --netns)")
        }
        (None, admin, netns) => {
            let token = token_from(a.admin_token_file.as_deref())?;
            from_agent(admin, netns.as_deref(), token, &sel, a.selector.as_deref())?
        }
    };
    if views.is_empty() {
        bail!("no pod matches {}", describe(&sel));
    }
    match (a.graph, a.output) {
        (Some(Graph::Dot), _) => print!("{}", dot(&views)),
        (Some(Graph::Svg), _) => std::io::stdout().write_all(&svg(&dot(&views))?)?,
        (None, Output::Json) => println!("{}", serde_json::to_string_pretty(&views)?),
        (None, Output::Text) => {
            for v in &views {
                print!("{}", text(v));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(sel: &Selection) -> String {
    match (&sel.pod, &sel.namespace) {
        (Some(p), _) => p.clone(),
        (None, Some(ns)) => format!("the selector in namespace {ns}"),
        (None, None) => "the selector in any namespace".into(),
    }
}

/// `GET /v1/show` of a running agent (`selector` as given: the agent parses it too).
fn from_agent(
    admin: Option<SocketAddr>,
    netns: Option<&str>,
    token: Option<Token>,
    sel: &Selection,
    selector: Option<&str>,
) -> Result<Vec<EndpointView>> {
    let addr = admin.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9890)));
    let client = match netns {
        Some(ns) if ns.contains('/') => Client::in_netns(addr, PathBuf::from(ns)),
        Some(ns) => Client::in_netns(addr, PathBuf::from(format!("/var/run/netns/{ns}"))),
        None => Client::new(addr),
    }
    .with_token(token);
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(p) = &sel.pod {
        q.append_pair("pod", p);
    }
    if let Some(ns) = &sel.namespace {
        q.append_pair("namespace", ns);
    }
    if let Some(s) = selector {
        q.append_pair("selector", s);
    }
    let path = format!("/v1/show?{}", q.finish());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    Ok(rt.block_on(client.get_json(&path))?)
}

/// The np-viewer-like listing of one pod.
pub fn text(v: &EndpointView) -> String {
    let mut out = format!(
        "{} (identity {}; labels {})\n",
        v.endpoint,
        v.identity,
        if v.labels.is_empty() {
            "none".into()
        } else {
            v.labels.join(", ")
        }
    );
    for dir in Direction::BOTH {
        out.push_str(&direction_text(dir, v.direction(dir)));
    }
    out
}

fn direction_text(dir: Direction, d: &DirectionView) -> String {
    let mut out = if d.isolated {
        format!(
            "  {dir}: isolated (default deny) by {}\n",
            d.isolated_by.join(", ")
        )
    } else if d.policies.is_empty() {
        format!("  {dir}: not isolated: no policy selects it for {dir}; everything allowed\n")
    } else {
        format!("  {dir}: not isolated: what no rule decides is allowed\n")
    };
    let to = if dir == Direction::Ingress {
        "from"
    } else {
        "to"
    };
    for p in &d.policies {
        let dd = if p.default_deny { ", default deny" } else { "" };
        out.push_str(&format!("    {} [{}{dd}]", p.policy, p.tier));
        if p.rules.is_empty() {
            out.push_str(": no rules (allows nothing)\n");
            continue;
        }
        out.push('\n');
        for r in &p.rules {
            out.push_str(&format!(
                "      {} {} {to} {}  ({})\n",
                r.action,
                r.ports.join(", "),
                peers_text(r),
                r.rule
            ));
            for l7 in &r.l7 {
                out.push_str(&format!("        {l7}\n"));
            }
        }
    }
    out
}

fn peers_text(r: &RuleView) -> String {
    match r.peer_pods.len() {
        0 => r.peers.clone(),
        1..=4 => format!("{} = {}", r.peers, r.peer_pods.join(", ")),
        n => format!("{} = {n} pods", r.peers),
    }
}

/// The selected pods and the peers their allow rules name, as a DOT digraph: an edge
/// from a peer to the pod (ingress) or from the pod to a peer (egress), labelled with the
/// ports (`+L7` when a proxy checks requests). A peer is each pod of the rule's peers,
/// or the rule's peer description when it names no pod (CIDRs, entities, FQDNs). A
/// direction no policy isolates gets one edge to or from `any`. A rule's allow can
/// still lose to a deny of an earlier tier: the listing says which.
pub fn dot(views: &[EndpointView]) -> String {
    let mut out = String::from("digraph ward {\n  rankdir=LR;\n  node [shape=box];\n");
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    for v in views {
        out.push_str(&format!(
            "  {} [style=filled, fillcolor=lightblue];\n",
            q(&v.endpoint)
        ));
    }
    for v in views {
        for dir in Direction::BOTH {
            let d = v.direction(dir);
            let mut edges: Vec<(String, String)> = Vec::new();
            if !d.isolated {
                edges.push(("any".into(), "all (not isolated)".into()));
            }
            for r in d.policies.iter().flat_map(|p| &p.rules) {
                if r.action != "allow" {
                    continue;
                }
                let label = format!(
                    "{}{}",
                    r.ports.join(", "),
                    if r.l7.is_empty() { "" } else { " +L7" }
                );
                if r.peer_pods.is_empty() {
                    out.push_str(&format!("  {} [shape=ellipse];\n", q(&r.peers)));
                    edges.push((r.peers.clone(), label));
                } else {
                    edges.extend(r.peer_pods.iter().map(|p| (p.clone(), label.clone())));
                }
            }
            for (peer, label) in edges {
                let (a, b) = match dir {
                    Direction::Ingress => (q(&peer), q(&v.endpoint)),
                    Direction::Egress => (q(&v.endpoint), q(&peer)),
                };
                out.push_str(&format!("  {a} -> {b} [label={}];\n", q(&label)));
            }
        }
    }
    out.push_str("}\n");
    out
}

/// The DOT text drawn as SVG by graphviz's `dot`.
fn svg(dot: &str) -> Result<Vec<u8>> {
    let mut child = match std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--graph svg needs graphviz's `dot` on PATH (Debian: apt-get install graphviz); \
             --graph dot writes the DOT text without it"
        ),
        Err(e) => return Err(e).context("cannot run graphviz's dot"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(dot.as_bytes())
            .context("cannot write to dot")?;
    }
    let out = child.wait_with_output().context("dot failed")?;
    if !out.status.success() {
        bail!(
            "dot -Tsvg failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
