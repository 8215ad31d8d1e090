//! One event of an agent's stream seen as a flow, the way Hubble's filters and printers
//! see one: a type, a verdict, two sides, an L4 protocol, the L7 request.

use std::net::IpAddr;
use std::time::SystemTime;

use agent::admin::api::Event;
use clap::ValueEnum;

/// Hubble's verdict names. Ward's records map onto them: a datapath drop and a request or
/// query the proxies denied are `DROPPED` (Ward's `denied`), a request or query the
/// proxies passed is `FORWARDED`, one that failed (upstream unreachable, bad answer) is
/// `ERROR`. Ward has no policy audit mode, so no record is `AUDIT`; the value is accepted
/// for scripts written for Hubble and matches nothing. Allowed L3/L4 packets are not
/// recorded (only the proxies' requests are), so `FORWARDED` lists L7 and DNS records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Verdict {
    #[value(name = "DROPPED", alias = "denied")]
    Dropped,
    #[value(name = "FORWARDED")]
    Forwarded,
    #[value(name = "AUDIT")]
    Audit,
    #[value(name = "ERROR")]
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Dropped => "DROPPED",
            Verdict::Forwarded => "FORWARDED",
            Verdict::Audit => "AUDIT",
            Verdict::Error => "ERROR",
        }
    }
}

/// The kind of record (`--type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// HTTP and DNS records (Hubble's L7 flows).
    L7,
    /// HTTP records only.
    Http,
    /// DNS records only.
    Dns,
    /// Datapath drops.
    Drop,
    /// Records of TLS sessions: a spliced or reset session, a request of an
    /// intercepted one, and a rule whose TLS material became unusable.
    Tls,
}

/// One side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Side {
    /// `namespace/name` when the address is a pod's.
    pub pod: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub identity: Option<u32>,
}

impl Side {
    pub fn namespace(&self) -> Option<&str> {
        self.pod.as_deref()?.split_once('/').map(|(ns, _)| ns)
    }

    /// `ns/pod:port` or `ip:port`, with Hubble's `(ID:n)` when known.
    pub fn describe(&self) -> String {
        let who = match (&self.pod, self.ip) {
            (Some(p), _) => p.clone(),
            (None, Some(IpAddr::V6(ip))) => format!("[{ip}]"),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "?".into(),
        };
        let port = if self.port == 0 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        match self.identity {
            Some(id) if id != 0 => format!("{who}{port} (ID:{id})"),
            _ => format!("{who}{port}"),
        }
    }
}

/// An event and the node whose agent recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub node: String,
    pub event: Event,
}

impl Flow {
    pub fn new(node: impl Into<String>, event: Event) -> Flow {
        Flow {
            node: node.into(),
            event,
        }
    }

    /// When it happened (None for the stream's notes, or an unreadable time).
    pub fn time(&self) -> Option<SystemTime> {
        match &self.event {
            Event::Drop(d) => humantime::parse_rfc3339_weak(&d.time).ok(),
            Event::Http(r) => humantime::parse_rfc3339_weak(&r.timestamp).ok(),
            Event::Dns(r) => Some(r.time),
            Event::Tls(t) => humantime::parse_rfc3339_weak(&t.time).ok(),
            _ => None,
        }
    }

    /// Whether it is a record (not a note of the stream).
    pub fn is_record(&self) -> bool {
        matches!(
            self.event,
            Event::Drop(_) | Event::Http(_) | Event::Dns(_) | Event::Tls(_)
        )
    }

    pub fn verdict(&self) -> Option<Verdict> {
        use audit::{dns, http};
        Some(match &self.event {
            Event::Drop(_) => Verdict::Dropped,
            Event::Http(r) => match r.verdict {
                http::Verdict::Forwarded => Verdict::Forwarded,
                http::Verdict::Denied => Verdict::Dropped,
                http::Verdict::Error => Verdict::Error,
            },
            Event::Dns(r) => match r.verdict {
                dns::Verdict::Forwarded => Verdict::Forwarded,
                dns::Verdict::Denied => Verdict::Dropped,
                dns::Verdict::Error => Verdict::Error,
            },
            // unusable material: the rule's connections are reset
            Event::Tls(_) => Verdict::Error,
            _ => return None,
        })
    }

    /// Whether the record is of kind `k`.
    pub fn is(&self, k: Kind) -> bool {
        match (k, &self.event) {
            (Kind::L7, Event::Http(_) | Event::Dns(_))
            | (Kind::Http, Event::Http(_))
            | (Kind::Dns, Event::Dns(_))
            | (Kind::Drop, Event::Drop(_)) => true,
            (Kind::Tls, Event::Http(r)) => r.tls.is_some(),
            (Kind::Tls, Event::Tls(_)) => true,
            _ => false,
        }
    }

    /// The L4 protocol, upper case (`TCP`, `UDP`, ...).
    pub fn l4(&self) -> Option<String> {
        Some(match &self.event {
            Event::Drop(d) => match d.protocol {
                6 => "TCP".into(),
                17 => "UDP".into(),
                132 => "SCTP".into(),
                1 => "ICMP".into(),
                58 => "ICMPv6".into(),
                n => format!("IP/{n}"),
            },
            Event::Http(_) => "TCP".into(),
            Event::Dns(r) => r.transport.to_uppercase(),
            _ => return None,
        })
    }

    /// `ingress` or `egress`: where the decision was made.
    pub fn direction(&self) -> Option<String> {
        match &self.event {
            Event::Drop(d) => Some(d.direction.to_lowercase()),
            Event::Http(r) => Some(r.observation_point.to_lowercase()),
            Event::Dns(_) => Some("egress".into()),
            _ => None,
        }
    }

    pub fn source(&self) -> Side {
        match &self.event {
            Event::Drop(d) => Side {
                pod: d.source.pod.clone(),
                ip: Some(d.source.ip),
                port: d.source.port,
                identity: Some(d.source.identity),
            },
            Event::Http(r) => http_side(&r.source_endpoint),
            Event::Dns(r) => Side {
                pod: match &r.source {
                    audit::dns::Source::Endpoint(p) => Some(p.clone()),
                    audit::dns::Source::Address(_) => None,
                },
                ip: Some(r.client.ip()),
                port: r.client.port(),
                identity: None,
            },
            _ => Side::default(),
        }
    }

    pub fn destination(&self) -> Side {
        match &self.event {
            Event::Drop(d) => Side {
                pod: d.destination.pod.clone(),
                ip: Some(d.destination.ip),
                port: d.destination.port,
                identity: Some(d.destination.identity),
            },
            Event::Http(r) => http_side(&r.destination_endpoint),
            Event::Dns(r) => Side {
                pod: None,
                ip: Some(r.server.ip()),
                port: r.server.port(),
                identity: None,
            },
            _ => Side::default(),
        }
    }

    /// The HTTP request of an HTTP record.
    pub fn http(&self) -> Option<&audit::http::Http> {
        match &self.event {
            Event::Http(r) => r.http.as_ref(),
            _ => None,
        }
    }
}

fn http_side(e: &audit::http::Endpoint) -> Side {
    Side {
        pod: e.pod.clone().filter(|p| p.contains('/')),
        ip: e.ip.parse().ok(),
        port: e.port,
        identity: Some(e.identity),
    }
}
