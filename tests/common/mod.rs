//! Test harness shared by the integration tests: real Postfix, a receiving
//! SMTP sink, redis-server, a loopback DNS server, and mxguard in-process.
#![allow(dead_code)]

pub mod daemon;
pub mod dns;
pub mod policy;
pub mod ports;
pub mod postfix;
pub mod postsrsd;
pub mod redis;
pub mod sink;
pub mod smtp;
pub mod stack;
