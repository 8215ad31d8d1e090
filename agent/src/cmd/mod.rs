pub mod agent;
pub mod conformance;
pub mod dns_proxy;
pub mod policy;
pub mod proxy;
pub mod status;
