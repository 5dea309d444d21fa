//! Free loopback ports for the services a test starts.

use std::{
    collections::HashSet,
    net::TcpListener,
    sync::{Mutex, PoisonError},
};

/// A port that was free a moment ago on 127.0.0.1 (the OS picked it), and
/// that this process has not handed out before: two ports taken one after
/// the other, before either is bound, differ. Something else may still take
/// it before the caller binds it; services that start on it retry.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("cannot find a free port: {e}"));
        let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port that was not handed out already");
}
