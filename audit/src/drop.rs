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
