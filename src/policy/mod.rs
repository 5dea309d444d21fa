//! The policy front end (Postfix `check_policy_service`).

pub mod protocol;
mod server;

pub use server::serve;
