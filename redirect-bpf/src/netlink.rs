//! The node's network namespace through rtnetlink: route lookups (what `ip route get`
//! answers), the links and routes of the redirect routing ([`crate::routing`]), and a
//! stream of route and link changes.
//!
//! The crate is rtnetlink (the rust-netlink project: netlink-packet-route for the
//! messages, netlink-proto for the tokio connection), the most used and maintained
//! netlink library in Rust, the one the rest of the ecosystem builds on. Everything
//! here talks to the kernel directly: no `ip` process, no text to parse.
//!
//! A netlink socket belongs to the network namespace of the thread that opened it:
//! [`Netlink::connect`] and [`NetChanges::watch`] take the calling thread's, and need a
//! tokio runtime, on which their connection task runs.

use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{Stream, StreamExt, TryStreamExt};
use nix::errno::Errno;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::{Handle, MulticastGroup};

/// A failed netlink operation: what was asked (`object`) and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct NetlinkError {
    pub object: String,
    pub reason: Reason,
}

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Reason {
    /// The kernel refused the request (its errno, shown as the system's text).
    #[error("{}", .0.desc())]
    Kernel(Errno),
    /// The socket could not be opened or set up.
    #[error("{0}")]
    Socket(std::io::Error),
    /// Anything else rtnetlink reports (an unexpected message, a request that failed
    /// without an errno).
    #[error("{0}")]
    Protocol(String),
}

impl NetlinkError {
    pub(crate) fn new(object: impl fmt::Display, reason: Reason) -> NetlinkError {
        NetlinkError {
            object: object.to_string(),
            reason,
        }
    }

    pub(crate) fn from_rtnetlink(object: impl fmt::Display, e: rtnetlink::Error) -> NetlinkError {
        let reason = match e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(code) => Reason::Kernel(Errno::from_raw(code.get().abs())),
                None => Reason::Protocol("an acknowledgement where an answer was due".into()),
            },
            other => Reason::Protocol(other.to_string()),
        };
        NetlinkError::new(object, reason)
    }

    /// The kernel's errno, when it refused the request.
    pub fn errno(&self) -> Option<Errno> {
        match self.reason {
            Reason::Kernel(e) => Some(e),
            _ => None,
        }
    }
}

/// A connection to the rtnetlink of the calling thread's network namespace. Cheap to
/// clone (the clones share the socket); the socket closes when the last one is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's network namespace and runs
    /// its connection on the current tokio runtime (it panics outside one, as
    /// `tokio::spawn` does).
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _unsolicited) = rtnetlink::new_connection()
            .map_err(|e| NetlinkError::new("opening a route netlink socket", Reason::Socket(e)))?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The route the kernel would take to `ip` now (RTM_GETROUTE, as `ip route get`
    /// asks): its type and output interface. None when there is no usable route: no
    /// route at all, or an unreachable, prohibit or blackhole one, which the kernel
    /// answers with an error.
    pub async fn route_to(&self, ip: IpAddr) -> Result<Option<RouteTo>, NetlinkError> {
        let object = format!("route lookup of {ip}");
        let mut query = RouteMessage::default();
        query.header.address_family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        query.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        query
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        let mut answers = self.handle.route().get(query).execute();
        let route = match answers.try_next().await {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(None),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(&object, e);
                return match e.errno() {
                    Some(
                        Errno::ENETUNREACH
                        | Errno::EHOSTUNREACH
                        | Errno::EACCES
                        | Errno::EINVAL
                        | Errno::ENODEV,
                    ) => Ok(None),
                    _ => Err(e),
                };
            }
        };
        let ifindex = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let interface = match ifindex {
            Some(i) => self.link_name(i).await?,
            None => None,
        };
        Ok(Some(RouteTo {
            kind: route.header.kind,
            ifindex,
            interface,
        }))
    }

    /// The interface a plain unicast route to `ip` goes out of, unless it is loopback:
    /// where a CNI's route to a pod (a /32 or /128 per pod, or a subnet per veth) leads.
    /// None for no route, a non-unicast one (local, unreachable, ...) and `lo`.
    pub async fn unicast_interface(&self, ip: IpAddr) -> Result<Option<String>, NetlinkError> {
        Ok(self.route_to(ip).await?.and_then(|r| {
            (r.kind == RouteType::Unicast)
                .then_some(r.interface)
                .flatten()
                .filter(|name| name != "lo")
        }))
    }

    /// The name of interface `ifindex`; None when there is none (it went away).
    pub async fn link_name(&self, ifindex: u32) -> Result<Option<String>, NetlinkError> {
        let link = self.link(ifindex, format!("link {ifindex}")).await?;
        Ok(link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        }))
    }

    /// The index of interface `name`; None when there is none.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(l) => Ok(l.map(|l| l.header.index)),
            Err(e) => not_found_is_none(NetlinkError::from_rtnetlink(format!("link {name}"), e)),
        }
    }

    async fn link(
        &self,
        ifindex: u32,
        object: String,
    ) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(e) => not_found_is_none(NetlinkError::from_rtnetlink(object, e)),
        }
    }
}

/// A link lookup that found nothing (ENODEV) is an answer, not an error.
fn not_found_is_none<T>(e: NetlinkError) -> Result<Option<T>, NetlinkError> {
    match e.errno() {
        Some(Errno::ENODEV) => Ok(None),
        _ => Err(e),
    }
}

/// What [`Netlink::route_to`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTo {
    pub kind: RouteType,
    /// The output interface (RTA_OIF), when the route has one.
    pub ifindex: Option<u32>,
    /// Its name, when it still exists.
    pub interface: Option<String>,
}

/// One change of the namespace's routes or links, as the kernel announced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetChange {
    /// A route was added or replaced (`removed: false`) or deleted, IPv4 or IPv6, in any
    /// table.
    Route { removed: bool },
    /// A link appeared or changed (state, name, address; `removed: false`) or went away.
    Link { ifindex: u32, removed: bool },
    /// The socket's buffer overflowed and announcements were lost: whoever follows the
    /// changes must look at the state again.
    Lost,
}

/// The route and link changes of a network namespace (RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE,
/// RTNLGRP_IPV6_ROUTE), as a tokio-driven [`Stream`]. It ends only if the socket fails.
pub struct NetChanges {
    changes: Pin<Box<dyn Stream<Item = NetChange> + Send>>,
}

/// The receive buffer asked for the change socket: room for a burst of announcements
/// (a CNI creating many pods at once) before the kernel drops them ([`NetChange::Lost`]).
/// (The kernel caps it at `net.core.rmem_max`.) An `int`, as SO_RCVBUF takes.
const CHANGES_RCVBUF: i32 = 1 << 20;

impl NetChanges {
    /// Subscribes to the calling thread's network namespace's route and link
    /// announcements; the connection runs on the current tokio runtime. Changes made
    /// after this returns are all seen (or reported [`NetChange::Lost`]).
    pub fn watch() -> Result<NetChanges, NetlinkError> {
        let groups = [
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ];
        let object = "subscribing to route and link changes";
        let (mut connection, _handle, messages) = rtnetlink::new_multicast_connection(&groups)
            .map_err(|e| NetlinkError::new(object, Reason::Socket(e)))?;
        connection
            .socket_mut()
            .socket_mut()
            .set_rx_buf_sz(CHANGES_RCVBUF)
            .map_err(|e| NetlinkError::new(object, Reason::Socket(e)))?;
        tokio::spawn(connection);
        let changes = messages.filter_map(|(message, _)| async move {
            match message.payload {
                NetlinkPayload::InnerMessage(m) => classify(m),
                NetlinkPayload::Overrun(_) => Some(NetChange::Lost),
                _ => None,
            }
        });
        Ok(NetChanges {
            changes: Box::pin(changes),
        })
    }
}

fn classify(m: RouteNetlinkMessage) -> Option<NetChange> {
    match m {
        RouteNetlinkMessage::NewRoute(_) => Some(NetChange::Route { removed: false }),
        RouteNetlinkMessage::DelRoute(_) => Some(NetChange::Route { removed: true }),
        RouteNetlinkMessage::NewLink(l) => Some(NetChange::Link {
            ifindex: l.header.index,
            removed: false,
        }),
        RouteNetlinkMessage::DelLink(l) => Some(NetChange::Link {
            ifindex: l.header.index,
            removed: true,
        }),
        _ => None,
    }
}

impl Stream for NetChanges {
    type Item = NetChange;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<NetChange>> {
        self.changes.poll_next_unpin(cx)
    }
}
