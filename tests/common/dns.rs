//! An authoritative DNS server on loopback (UDP and TCP, one port), in the
//! test process, serving exactly the records a test loads — and failing on
//! demand. Built on hickory-proto's message encoding only.

use hickory_proto::{
    op::{Message, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, MX, PTR, SOA, TXT},
    },
};
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};

/// A failure to produce for one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    ServFail,
    Refused,
    /// No answer at all.
    Timeout,
    /// Over UDP an empty answer with the TC bit; over TCP the full answer.
    Truncate,
}

#[derive(Default)]
struct Zone {
    records: HashMap<String, Vec<RData>>,
    faults: HashMap<String, Fault>,
}

struct Shared {
    zone: Mutex<Zone>,
    ttl: AtomicU32,
    answered: AtomicUsize,
}

pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Lowercase, with the trailing dot.
fn key(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    if n.ends_with('.') { n } else { format!("{n}.") }
}

fn name(s: &str) -> Name {
    Name::from_ascii(key(s)).unwrap_or_else(|e| panic!("bad DNS name {s:?}: {e}"))
}

/// The reverse-lookup name of an address (in-addr.arpa or ip6.arpa).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

fn lock(m: &Mutex<Zone>) -> std::sync::MutexGuard<'_, Zone> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DnsServer {
    pub async fn start() -> io::Result<DnsServer> {
        // Bind TCP on a free port, then UDP on the same one; retry if UDP's
        // is taken.
        for _ in 0..10 {
            let tcp = TcpListener::bind("127.0.0.1:0").await?;
            let addr = tcp.local_addr()?;
            let Ok(udp) = UdpSocket::bind(addr).await else {
                continue;
            };
            let shared = Arc::new(Shared {
                zone: Mutex::new(Zone::default()),
                ttl: AtomicU32::new(300),
                answered: AtomicUsize::new(0),
            });
            let tasks = vec![
                tokio::spawn(serve_udp(udp, shared.clone())),
                tokio::spawn(serve_tcp(tcp, shared.clone())),
            ];
            return Ok(DnsServer {
                addr,
                shared,
                tasks,
            });
        }
        Err(io::Error::other("no port free for both UDP and TCP"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TTL of the answers from now on (default 300).
    pub fn set_ttl(&self, ttl: u32) {
        self.shared.ttl.store(ttl, Ordering::Relaxed);
    }

    fn add(&self, owner: &str, data: RData) {
        lock(&self.shared.zone)
            .records
            .entry(key(owner))
            .or_default()
            .push(data);
    }

    /// A TXT record; text over 255 bytes is split into several strings, as
    /// DNS requires (readers join them).
    pub fn add_txt(&self, owner: &str, text: &str) {
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        let chunks = if chunks.is_empty() {
            vec![&b""[..]]
        } else {
            chunks
        };
        self.add(owner, RData::TXT(TXT::from_bytes(chunks)));
    }

    pub fn add_a(&self, owner: &str, ip: Ipv4Addr) {
        self.add(owner, RData::A(A(ip)));
    }

    pub fn add_aaaa(&self, owner: &str, ip: Ipv6Addr) {
        self.add(owner, RData::AAAA(AAAA(ip)));
    }

    pub fn add_mx(&self, owner: &str, preference: u16, exchange: &str) {
        self.add(owner, RData::MX(MX::new(preference, name(exchange))));
    }

    pub fn add_ptr(&self, ip: IpAddr, target: &str) {
        self.add(&reverse_name(ip), RData::PTR(PTR(name(target))));
    }

    pub fn set_fault(&self, owner: &str, fault: Fault) {
        lock(&self.shared.zone).faults.insert(key(owner), fault);
    }

    pub fn clear(&self) {
        *lock(&self.shared.zone) = Zone::default();
    }

    /// How many queries were answered so far.
    pub fn queries(&self) -> usize {
        self.shared.answered.load(Ordering::Relaxed)
    }
}

/// The answer to one query packet; None: stay silent.
fn answer(packet: &[u8], shared: &Shared, over_tcp: bool) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    let Some(query) = request.queries.first().cloned() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.add_query(query.clone());
    let owner = key(&query.name().to_ascii());
    let zone = lock(&shared.zone);
    match zone.faults.get(&owner) {
        Some(Fault::Timeout) => return None,
        Some(Fault::ServFail) => response.metadata.response_code = ResponseCode::ServFail,
        Some(Fault::Refused) => response.metadata.response_code = ResponseCode::Refused,
        Some(Fault::Truncate) if !over_tcp => response.metadata.truncation = true,
        _ => fill(
            &mut response,
            &zone,
            &owner,
            &query,
            shared.ttl.load(Ordering::Relaxed),
        ),
    }
    drop(zone);
    shared.answered.fetch_add(1, Ordering::Relaxed);
    response.to_vec().ok()
}

fn fill(response: &mut Message, zone: &Zone, owner: &str, query: &Query, ttl: u32) {
    let qname = query.name().clone();
    match zone.records.get(owner) {
        Some(records) => {
            let matching: Vec<&RData> = records
                .iter()
                .filter(|r| {
                    query.query_type() == RecordType::ANY || r.record_type() == query.query_type()
                })
                .collect();
            for r in &matching {
                response.add_answer(Record::from_rdata(qname.clone(), ttl, (*r).clone()));
            }
            if matching.is_empty() {
                response.add_authority(soa(owner));
            }
        }
        None => {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(soa(owner));
        }
    }
}

/// The SOA that makes a negative answer cacheable (negative TTL 60 s).
fn soa(owner: &str) -> Record {
    let zone = owner.split_once('.').map_or(
        ".",
        |(_, parent)| if parent.is_empty() { "." } else { parent },
    );
    let apex = name(zone);
    let data = SOA::new(
        name("ns.test"),
        name("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        60,
    );
    Record::from_rdata(apex, 60, RData::SOA(data))
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], &shared, false) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve_tcp_connection(stream, shared.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_tcp_connection(mut stream: TcpStream, shared: Arc<Shared>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut packet).await.is_err() {
            return;
        }
        let Some(reply) = answer(&packet, &shared, true) else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            continue;
        };
        if stream.write_all(&reply_len.to_be_bytes()).await.is_err()
            || stream.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}

/// Sends one query and returns the parsed answer (UDP or TCP).
pub async fn query(
    server: SocketAddr,
    owner: &str,
    rtype: RecordType,
    tcp: bool,
) -> io::Result<Message> {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(owner), rtype));
    let packet = msg.to_vec().map_err(|e| io::Error::other(e.to_string()))?;
    let reply = if tcp {
        let mut s = TcpStream::connect(server).await?;
        let len = u16::try_from(packet.len()).map_err(io::Error::other)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(&packet).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await?;
        buf
    } else {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        s.send_to(&packet, server).await?;
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf).await?;
        buf.truncate(n);
        buf
    };
    Message::from_vec(&reply).map_err(|e| io::Error::other(e.to_string()))
}
