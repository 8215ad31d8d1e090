//! Limits and timeouts of the proxy. Every field has a default; the names are the config
//! keys (serde, snake_case), and durations are given in milliseconds.

use std::time::Duration;

use serde::Deserialize;

use crate::normalize::Backslash;
use crate::request::Underscores;

/// Proxy configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `header_read_timeout_ms`: time a client has to send a complete request head
    /// (slowloris protection, HTTP/1.1).
    pub header_read_timeout_ms: u64,
    /// `idle_timeout_ms`: a downstream connection with no bytes in either direction for
    /// this long is closed.
    pub idle_timeout_ms: u64,
    /// `upstream_connect_timeout_ms`: time to establish an upstream TCP connection before
    /// the request is answered with 503.
    pub upstream_connect_timeout_ms: u64,
    /// `max_header_size`: largest request head accepted (HTTP/1.1 read buffer, HTTP/2
    /// header list). Larger heads get 431 (HTTP/1.1) or a stream reset (HTTP/2).
    pub max_header_size: usize,
    /// `max_concurrent_streams`: HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
    /// `max_connections`: open downstream connections; further connections wait in the
    /// kernel's accept queue.
    pub max_connections: usize,
    /// `max_idle_upstream_per_destination`: idle HTTP/1.1 upstream connections kept per
    /// destination.
    pub max_idle_upstream_per_destination: usize,
    /// `audit_queue`: audit records buffered between the data path and the writer; when
    /// full, records are dropped and counted.
    pub audit_queue: usize,
    /// `upstream_mark`: SO_MARK on upstream sockets so the datapath does not redirect
    /// the proxy's own traffic (Cilium: 0xb00 egress, 0xa00 ingress). Needs
    /// CAP_NET_ADMIN; off when absent.
    pub upstream_mark: Option<u32>,
    /// `transparent_source`: upstream connections keep the client's source address
    /// (IP_TRANSPARENT + bind), so the destination sees the real client. Needs
    /// CAP_NET_ADMIN, and the datapath must deliver the replies to the proxy. Off by
    /// default until the datapath does that.
    pub transparent_source: bool,
    /// `node`: the node the proxy runs on (host vs remote-node identities).
    pub node: Option<String>,
    /// `path_backslash`: `reject` (400, the default) or `slash` (a raw `\` in the path
    /// reads as `/` before normalising, and goes upstream as `/`).
    pub path_backslash: Backslash,
    /// `headers_with_underscores`: `reject` (400, the default) or `drop` (removed before
    /// the decision).
    pub headers_with_underscores: Underscores,
    /// `h2_max_inbound_priority_frames_per_stream`: an HTTP/2 connection may send this
    /// many PRIORITY frames per stream it opened, plus this many, before it gets GOAWAY
    /// ENHANCE_YOUR_CALM (Envoy's option of the same name and default).
    pub h2_max_inbound_priority_frames_per_stream: u32,
    /// `h2_max_inbound_window_update_frames_per_data_frame_sent`: WINDOW_UPDATE frames
    /// allowed per DATA frame the proxy sent on the connection, beyond 5 + 2 per stream
    /// opened (Envoy's option of the same name and default).
    pub h2_max_inbound_window_update_frames_per_data_frame_sent: u32,
    /// `h2_max_inbound_control_frames`: PING and SETTINGS frames (not acknowledgements)
    /// allowed on an HTTP/2 connection beyond one per stream opened, one per DATA frame
    /// sent and one per second of the connection's age.
    pub h2_max_inbound_control_frames: u32,
    /// `tls_handshake_timeout_ms`: a TLS connection's ClientHello must be complete, and
    /// an intercepted session's handshake done, this long after its first byte; then
    /// it is reset.
    pub tls_handshake_timeout_ms: u64,
    /// `tls_max_handshakes`: TLS connections reading their ClientHello or handshaking
    /// at once; more wait (within the handshake timeout) for one to finish.
    pub tls_max_handshakes: usize,
    /// `tls_minted_cache`: leaves minted from CA secrets kept (per SNI), least recently
    /// used first out.
    pub tls_minted_cache: usize,
    /// `tls_system_roots`: an intercepting rule without `originatingTLS` verifies the
    /// server against the node's root certificates (Ward's extension; without it such a
    /// rule fails closed, and Cilium has no fallback at all).
    pub tls_system_roots: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            upstream_connect_timeout_ms: 2_000,
            max_header_size: 64 * 1024,
            max_concurrent_streams: 128,
            max_connections: 50_000,
            max_idle_upstream_per_destination: 256,
            audit_queue: 8192,
            upstream_mark: None,
            transparent_source: false,
            node: None,
            path_backslash: Backslash::Reject,
            headers_with_underscores: Underscores::Reject,
            h2_max_inbound_priority_frames_per_stream: 100,
            h2_max_inbound_window_update_frames_per_data_frame_sent: 10,
            h2_max_inbound_control_frames: 100,
            tls_handshake_timeout_ms: 10_000,
            tls_max_handshakes: 1024,
            tls_minted_cache: 4096,
            tls_system_roots: false,
        }
    }
}

impl Config {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn upstream_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_override_defaults_and_unknown_keys_are_rejected() {
        let c: Config =
            serde_json::from_str(r#"{"idle_timeout_ms": 5, "upstream_mark": 2816}"#).unwrap();
        assert_eq!(c.idle_timeout(), Duration::from_millis(5));
        assert_eq!(c.upstream_mark, Some(0xb00));
        assert_eq!(c.max_header_size, Config::default().max_header_size);
        assert!(serde_json::from_str::<Config>(r#"{"idle_timeout": 5}"#).is_err());
        let c: Config = serde_json::from_str(
            r#"{"path_backslash": "slash", "headers_with_underscores": "drop"}"#,
        )
        .unwrap();
        assert_eq!(c.path_backslash, Backslash::Slash);
        assert_eq!(c.headers_with_underscores, Underscores::Drop);
        let bad = serde_json::from_str::<Config>(r#"{"headers_with_underscores": "allow"}"#);
        assert!(bad.unwrap_err().to_string().contains("unknown variant"));
    }
}
