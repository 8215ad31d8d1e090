pub mod conformance;
pub mod policy;
