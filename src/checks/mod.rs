//! The checks of the decision core. Each takes the facts of the transaction
//! (and, where it needs them, the clock, store and resolver) and returns a
//! verdict; none of them touches a socket.

pub mod address;
pub mod allowlist;
pub mod auth;
pub mod autodeny;
pub mod backscatter;
pub mod clients;
pub mod content;
pub mod denylist;
pub mod greylist;
pub mod oplists;
pub mod ratelimit;
