//! Free loopback ports for the services a test starts.

use std::net::TcpListener;

/// A port that was free a moment ago on 127.0.0.1 (the OS picked it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}
