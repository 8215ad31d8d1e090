//! A packet the datapath dropped, as the agent reads it from the drop-event ring buffer
//! and names its pods.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One datapath drop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 with milliseconds, when the agent read it.
    pub time: String,
    pub verdict: String,
    /// The datapath's drop reason (`policy_default_deny`, ...).
    pub reason: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// IP protocol number.
    pub protocol: u8,
    pub source: Peer,
    pub destination: Peer,
    pub ifindex: u32,
    /// The policy map entry's cookie (0 when no entry decided).
    pub cookie: u32,
    /// The deciding policy (`Kind namespace/name`), as `ward policy trace` names it; absent
    /// for drops that are not policy verdicts and when the agent had no policy yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The deciding rule's field path, when a rule decided (not a default deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The policy model's explanation of the dropped side, the words of `ward policy
    /// trace` (`default deny: selected by ...`, `denied by ...`). Computed by the agent
    /// when it reads the event, with the policy in force then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// One side of a dropped packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: u32,
    /// `namespace/name` when the IP is a pod's.
    #[serde(default)]
    pub pod: Option<String>,
}
