pub mod conformance;
pub mod policy;
pub mod proxy;
