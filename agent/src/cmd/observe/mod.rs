//! `ward observe`: the drops and proxy records of one or more agents as one timeline,
//! with Hubble's filters and printers (`hubble observe`'s flags where they mean something
//! for Ward).

mod filter;
mod flow;
mod render;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use agent::admin::api::Event;
use agent::admin::auth::Token;
use agent::admin::client::{token_from, Client};
use anyhow::{bail, Context, Result};
use regex::Regex;
use tokio::sync::mpsc;

use filter::{Filter, PodMatch, Protocol};
use flow::{Flow, Kind, Verdict};
use render::{Output, Table};

/// The admin address every agent listens on by default.
const DEFAULT_ADMIN: &str = "127.0.0.1:9890";

#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ObserveArgs {
    /// An agent's admin address (repeatable: the agents' records are merged by time).
    #[arg(long, value_name = "ADDR")]
    admin: Vec<SocketAddr>,
    /// Network namespace of the agent (name under /var/run/netns, or a path); repeatable,
    /// one agent per namespace (each on the one --admin address, or paired with the
    /// --admin addresses in order).
    #[arg(long, value_name = "NETNS")]
    netns: Vec<String>,
    /// File holding the agents' admin token (their --admin-token-file), sent as
    /// `Authorization: Bearer`.
    #[arg(long, value_name = "FILE", env = "WARD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Flows from or to this pod (NAMESPACE/POD or POD; the pod name is a prefix).
    #[arg(long, value_name = "NS/POD")]
    pod: Vec<String>,
    /// Flows from this pod.
    #[arg(long, value_name = "NS/POD")]
    from_pod: Vec<String>,
    /// Flows to this pod.
    #[arg(long, value_name = "NS/POD")]
    to_pod: Vec<String>,
    /// Flows from or to a pod of this namespace.
    #[arg(short = 'n', long)]
    namespace: Vec<String>,
    /// Flows from a pod of this namespace.
    #[arg(long)]
    from_namespace: Vec<String>,
    /// Flows to a pod of this namespace.
    #[arg(long)]
    to_namespace: Vec<String>,
    /// Flows from or to this IP.
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// Flows from this IP.
    #[arg(long)]
    from_ip: Vec<IpAddr>,
    /// Flows to this IP.
    #[arg(long)]
    to_ip: Vec<IpAddr>,
    /// Hubble's verdict: DROPPED (Ward's `denied`), FORWARDED, ERROR, AUDIT (matches
    /// nothing: Ward has no audit mode). Case does not matter.
    #[arg(long, value_enum, ignore_case = true)]
    verdict: Vec<Verdict>,
    /// The record's type: l7 (HTTP and DNS), http, dns, drop, tls.
    #[arg(short = 't', long = "type", value_enum, ignore_case = true)]
    kind: Vec<Kind>,
    /// tcp, udp, sctp, icmp, icmpv6, or http/dns for the proxies' records.
    #[arg(long, value_enum, ignore_case = true)]
    protocol: Vec<Protocol>,
    /// Flows with this source or destination port.
    #[arg(long)]
    port: Vec<u16>,
    /// Flows with this source port.
    #[arg(long)]
    from_port: Vec<u16>,
    /// Flows with this destination port.
    #[arg(long)]
    to_port: Vec<u16>,
    /// HTTP requests with this method.
    #[arg(long)]
    http_method: Vec<String>,
    /// HTTP requests whose path (with query) matches this regular expression
    /// (unanchored, as Hubble's; `^/v1/` anchors).
    #[arg(long, value_name = "REGEX")]
    http_path: Vec<String>,
    /// Flows recorded by the agent of this node.
    #[arg(long)]
    node_name: Vec<String>,
    /// Flows since this time: a duration back from now (5m, 1h30m) or an RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Flows until this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only the last N matching flows the agents hold (then follow, with -f).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Keep printing new flows as they come (otherwise: what the agents hold, then exit).
    #[arg(short = 'f', long)]
    follow: bool,
    /// compact, table, json (the agent's record) or jsonpb (Hubble's flow shape).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Compact, ignore_case = true)]
    output: Output,
}

const AFTER_HELP: &str = "\
Verdicts: a datapath drop and a request or query the proxies denied are DROPPED (Ward's
`denied`); a request or query they passed is FORWARDED; one that failed is ERROR.
Each agent holds its most recent 1024 records; without -f they are printed (filtered,
merged by time, --last N of them) and ward observe exits.";

/// One agent to read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub admin: SocketAddr,
    pub netns: Option<PathBuf>,
}

impl Target {
    fn label(&self) -> String {
        match &self.netns {
            Some(ns) => format!("{}@{}", self.admin, ns.display()),
            None => self.admin.to_string(),
        }
    }

    fn client(&self) -> Client {
        match &self.netns {
            Some(ns) => Client::in_netns(self.admin, ns.clone()),
            None => Client::new(self.admin),
        }
    }
}

fn netns_path(ns: &str) -> PathBuf {
    if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from(format!("/var/run/netns/{ns}"))
    }
}

/// The agents the flags name: every --admin, each --netns with the one --admin (or the
/// default), or --netns and --admin paired in order.
pub fn targets(admin: &[SocketAddr], netns: &[String]) -> Result<Vec<Target>> {
    let default: SocketAddr = DEFAULT_ADMIN.parse().context("the default admin address")?;
    let admins = if admin.is_empty() {
        vec![default]
    } else {
        admin.to_vec()
    };
    if netns.is_empty() {
        return Ok(admins
            .into_iter()
            .map(|admin| Target { admin, netns: None })
            .collect());
    }
    if admins.len() != 1 && admins.len() != netns.len() {
        bail!(
            "{} --netns and {} --admin: give one --admin for every --netns, or one for all",
            netns.len(),
            admins.len()
        );
    }
    Ok(netns
        .iter()
        .enumerate()
        .map(|(i, ns)| Target {
            admin: admins.get(i).copied().unwrap_or(admins[0]),
            netns: Some(netns_path(ns)),
        })
        .collect())
}

impl ObserveArgs {
    /// The filters of the flags; a bad value is an error naming the flag.
    pub fn filter(&self, now: SystemTime) -> Result<Filter> {
        let default_ns = match self.namespace.as_slice() {
            [one] => one.as_str(),
            _ => "default",
        };
        let pods = |flag: &str, list: &[String]| -> Result<Vec<PodMatch>> {
            list.iter()
                .map(|p| PodMatch::parse(p, default_ns).with_context(|| format!("--{flag}")))
                .collect()
        };
        let regexes = self
            .http_path
            .iter()
            .map(|r| {
                Regex::new(r)
                    .with_context(|| format!("--http-path {r:?}: not a regular expression"))
            })
            .collect::<Result<Vec<_>>>()?;
        let time = |flag: &str, t: &Option<String>| {
            t.as_deref()
                .map(|s| filter::parse_time(s, now).with_context(|| format!("--{flag}")))
                .transpose()
        };
        Ok(Filter {
            pods: pods("pod", &self.pod)?,
            from_pods: pods("from-pod", &self.from_pod)?,
            to_pods: pods("to-pod", &self.to_pod)?,
            // with --pod, --namespace only names the bare pods' namespace (as Hubble's)
            namespaces: if self.pod.is_empty() && self.from_pod.is_empty() && self.to_pod.is_empty()
            {
                self.namespace.clone()
            } else {
                Vec::new()
            },
            from_namespaces: self.from_namespace.clone(),
            to_namespaces: self.to_namespace.clone(),
            ips: self.ip.clone(),
            from_ips: self.from_ip.clone(),
            to_ips: self.to_ip.clone(),
            verdicts: self.verdict.clone(),
            kinds: self.kind.clone(),
            protocols: self.protocol.clone(),
            ports: self.port.clone(),
            from_ports: self.from_port.clone(),
            to_ports: self.to_port.clone(),
            http_methods: self.http_method.iter().map(|m| m.to_uppercase()).collect(),
            http_paths: regexes,
            nodes: self.node_name.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
        })
    }
}

/// What a reader task tells the printer.
enum Msg {
    /// Everything the agent held (and, following, the mark that it caught up).
    Held(Vec<Flow>),
    Live(Box<Flow>),
    Failed(anyhow::Error),
}

pub fn run(a: ObserveArgs) -> Result<ExitCode> {
    let filter = a.filter(SystemTime::now())?;
    let targets = targets(&a.admin, &a.netns)?;
    let token = token_from(a.admin_token_file.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(observe(&a, &filter, targets, token))?;
    Ok(ExitCode::SUCCESS)
}

async fn observe(
    a: &ObserveArgs,
    filter: &Filter,
    targets: Vec<Target>,
    token: Option<Token>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let agents = targets.len();
    for t in targets {
        tokio::spawn(read(t, token.clone(), a.follow, tx.clone()));
    }
    drop(tx);
    let mut held = Vec::new();
    let mut early = Vec::new();
    let mut caught_up = 0;
    while caught_up < agents {
        match rx.recv().await {
            Some(Msg::Held(flows)) => {
                held.extend(flows);
                caught_up += 1;
            }
            Some(Msg::Live(f)) => early.push(*f),
            Some(Msg::Failed(e)) => return Err(e),
            None => break,
        }
    }
    filter::by_time(&mut held);
    let held: Vec<Flow> = held.into_iter().filter(|f| filter.matches(f)).collect();
    let held = filter::last(held, a.last);
    let mut printer = Printer::new(a.output, &held);
    for f in held
        .iter()
        .chain(early.iter().filter(|f| filter.matches(f)))
    {
        printer.print(f)?;
    }
    while let Some(m) = rx.recv().await {
        match m {
            Msg::Live(f) if filter.matches(&f) => printer.print(&f)?,
            Msg::Failed(e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Reads one agent: its node name, what it holds, then (following) what comes.
async fn read(t: Target, token: Option<Token>, follow: bool, tx: mpsc::Sender<Msg>) {
    let label = t.label();
    let c = t.client().with_token(token);
    let fail = |e: anyhow::Error| Msg::Failed(e.context(format!("agent {label}")));
    let node = match c.status().await {
        Ok(s) => s.node,
        Err(e) => {
            let _ = tx.send(fail(e.into())).await;
            return;
        }
    };
    let mut events = match c.events(follow).await {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(fail(e.into())).await;
            return;
        }
    };
    let mut held = Vec::new();
    let mut holding = true;
    loop {
        match events.next().await {
            Ok(Some(Event::CaughtUp)) if holding => {
                holding = false;
                if tx.send(Msg::Held(std::mem::take(&mut held))).await.is_err() {
                    return;
                }
            }
            Ok(Some(e)) if holding => held.push(Flow::new(node.clone(), e)),
            Ok(Some(e)) => {
                if tx
                    .send(Msg::Live(Box::new(Flow::new(node.clone(), e))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => {
                if holding {
                    let _ = tx.send(Msg::Held(held)).await;
                }
                return;
            }
            Err(e) => {
                let _ = tx.send(fail(e.into())).await;
                return;
            }
        }
    }
}

/// Prints flows in the chosen output, flushing each line (followers read it at once).
struct Printer {
    output: Output,
    table: Option<Table>,
}

impl Printer {
    fn new(output: Output, held: &[Flow]) -> Printer {
        let table = (output == Output::Table).then(|| {
            let mut t = Table::default();
            t.fit(held);
            println!("{}", t.header());
            t
        });
        Printer { output, table }
    }

    fn print(&mut self, f: &Flow) -> Result<()> {
        use std::io::Write;
        let line = match (self.output, &self.table) {
            (Output::Compact, _) => render::compact(f),
            (Output::Table, Some(t)) => t.line(f),
            (Output::Table, None) => render::compact(f),
            (Output::Json, _) => render::json(f)?,
            (Output::Jsonpb, _) => render::jsonpb(f)?,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
