//! Ward's node agent as a library: the `ward` binary (`src/main.rs`) parses the command
//! line and calls in here.
//!
//! - [`source`]: where cluster state and policies come from (a directory of YAML, or the
//!   Kubernetes API), behind the [`source::Source`] trait.
//! - [`reconcile`]: the tasks that keep the datapath and the proxies in step with the
//!   source, each owning its state: the policy publisher, the endpoint attacher, the
//!   conntrack sweeper, the drop-event reader and the DNS hand-off lane.
//! - [`app`]: the agent's settings and the wiring of the tasks, proxies and runtimes.
//! - [`admin`]: the admin HTTP endpoint, its typed responses, and the client that
//!   `ward status` and `ward observe` use.
//! - [`telemetry`]: logs (tracing), metrics, the event stream and the audit log.

pub mod admin;
pub mod app;
pub mod datapath;
pub mod inputs;
pub mod reconcile;
pub mod source;
pub mod store;
pub mod telemetry;
