//! A milter session through the real daemon and callbacks: the input is a
//! sequence of commands (command byte, payload length, payload), framed as
//! the milter protocol frames them, after a valid negotiation so the later
//! stages are reached. mxguard runs once, in process, on a loopback port;
//! any panic in it aborts the process (libFuzzer's panic hook).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::OnceLock,
    time::Duration,
};

fn daemon() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mxguard-fuzz-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("{}: {e}", dir.display());
        }
        let path = dir.join("mxguard.yaml");
        // Nothing answers DNS on port 9: every lookup fails at once.
        let yaml = format!(
            "milter: {{ listen: \"inet:127.0.0.1:0\", max_connections: 10000 }}\n\
             policy: {{ listen: null }}\nsocketmap: {{ listen: null }}\nhttp: {{ listen: null }}\n\
             store: {{ path: \"{}/state.db\" }}\nhostname: mx.fuzz.test\n\
             log: {{ level: error }}\n\
             dns: {{ nameservers: [\"127.0.0.1:9\"], timeout: 1s }}\n\
             domains: {{ example.org: {{ rules: [\"alice:alice@example.net\", \"/^(.+)$/:$1@example.net\"] }} }}\n",
            dir.display()
        );
        if let Err(e) = std::fs::write(&path, yaml) {
            panic!("{e}");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => panic!("{e}"),
            };
            rt.block_on(async move {
                let file = match mxguard::ConfigFile::load(&path) {
                    Ok(f) => f,
                    Err(e) => panic!("{e}"),
                };
                let listeners = match mxguard::Listeners::bind(&file.config).await {
                    Ok(l) => l,
                    Err(e) => panic!("{e}"),
                };
                let addr = match listeners.milter_addr() {
                    Some(mxguard::config::ListenAddr::Inet { host, port }) => {
                        match format!("{host}:{port}").parse::<SocketAddr>() {
                            Ok(a) => a,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    other => panic!("milter address {other:?}"),
                };
                let _ = tx.send(addr);
                let (_reload, reload_rx) = tokio::sync::mpsc::channel(1);
                let _ = mxguard::run(listeners, file, reload_rx, std::future::pending::<()>()).await;
            });
        });
        match rx.recv() {
            Ok(a) => a,
            Err(e) => panic!("the daemon did not start: {e}"),
        }
    })
}

fn frame(out: &mut Vec<u8>, cmd: u8, payload: &[u8]) {
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.push(cmd);
    out.extend_from_slice(payload);
}

fuzz_target!(|data: &[u8]| {
    let addr = daemon();
    let mut wire = Vec::new();
    // Version 6, every action and protocol option, as Postfix offers them.
    let mut negotiate = Vec::new();
    negotiate.extend_from_slice(&6u32.to_be_bytes());
    negotiate.extend_from_slice(&0x1ffu32.to_be_bytes());
    negotiate.extend_from_slice(&0x1f_ffffu32.to_be_bytes());
    frame(&mut wire, b'O', &negotiate);
    let mut rest = data;
    while let [cmd, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        frame(&mut wire, *cmd, &tail[..n]);
        rest = &tail[n..];
    }
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.write_all(&wire);
    let _ = conn.shutdown(Shutdown::Write);
    // Until the daemon closes the connection (or the timeout): it must
    // answer or hang up, never stall.
    let mut sink = [0u8; 4096];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
});
