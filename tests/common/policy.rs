//! A policy-delegation client that keeps one connection for many
//! requests, as Postfix does.

use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

pub struct Policy(BufReader<TcpStream>);

impl Policy {
    pub async fn open(addr: SocketAddr) -> Policy {
        Policy(BufReader::new(
            TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("policy connect {addr}: {e}")),
        ))
    }

    /// Sends a request (its bytes as given, ended by the empty line); its
    /// answer (the `action=` line), or None when mxguard closed the
    /// connection instead of answering.
    pub async fn ask(&mut self, request: &[u8]) -> Option<String> {
        if self.0.get_mut().write_all(request).await.is_err() {
            return None;
        }
        let mut answer = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.0.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("no policy answer within 10 s"))
                .ok()?;
            if n == 0 {
                return None;
            }
            if line == "\n" {
                return Some(answer.trim_end().to_owned());
            }
            answer.push_str(&line);
        }
    }
}
