//! An authoritative DNS server on loopback (UDP and TCP, one port), in the
//! test process, serving exactly the records a test loads — and failing on
//! demand. Built on hickory-proto's message encoding only.
//!
//! What it does, as a real authoritative server would: answers carry the AA
//! bit and the TTL of [`DnsServer::set_ttl`]; a name with records of other
//! types only (or only names below it) gets NOERROR with no answer, an unknown
//! name NXDOMAIN, both with an SOA (negative TTL 60 s) in the authority
//! section; a UDP answer larger than the asker accepts (512 bytes, or its EDNS
//! size, at most 4096) comes back empty with the TC bit, so the asker retries
//! over TCP; packets that are not queries are ignored.

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
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
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::{JoinHandle, JoinSet},
};

/// The TTL of answers until [`DnsServer::set_ttl`] changes it.
pub const DEFAULT_TTL: u32 = 300;
/// The TTL, and SOA minimum, of negative answers (NXDOMAIN, NODATA).
pub const NEGATIVE_TTL: u32 = 60;
/// The EDNS payload size the server announces (as common resolvers do).
const EDNS_PAYLOAD: u16 = 1232;
/// The largest UDP answer sent, whatever size the asker announces.
const MAX_UDP_ANSWER: usize = 4096;

/// A failure to produce for one name (for every record type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    ServFail,
    Refused,
    /// No answer at all, over UDP or TCP (a TCP connection stays open).
    Timeout,
    /// Over UDP an empty answer with the TC bit; over TCP the full answer.
    Truncate,
    /// Over UDP an empty answer with the TC bit; over TCP no answer (the
    /// connection stays open), so the retry over TCP goes unanswered.
    TruncateTcpSilent,
    /// The right answer, sent this long after the question.
    Slow(std::time::Duration),
}

#[derive(Default)]
struct Zone {
    /// Owner (lowercase, trailing dot) → its records, in the order added.
    records: HashMap<String, Vec<RData>>,
    faults: HashMap<String, Fault>,
}

impl Zone {
    /// Whether the name exists: it has records, or a name below it has (an
    /// "empty non-terminal", which is NODATA rather than NXDOMAIN).
    fn exists(&self, owner: &str) -> bool {
        self.records.contains_key(owner)
            || owner == "."
            || self
                .records
                .keys()
                .any(|k| k.strip_suffix(owner).is_some_and(|p| p.ends_with('.')))
    }
}

struct Shared {
    zone: Mutex<Zone>,
    ttl: AtomicU32,
    answered: AtomicUsize,
    /// The SOA data of every negative answer.
    soa: SOA,
}

impl Shared {
    fn zone(&self) -> MutexGuard<'_, Zone> {
        // A test that panicked while holding the lock leaves a usable zone.
        self.zone.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The server; it stops (its tasks aborted, its sockets closed as soon as
/// the runtime runs them again) when dropped.
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

/// Lowercase, with the trailing dot: the key of a name in the zone.
fn key(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    if n.ends_with('.') { n } else { format!("{n}.") }
}

/// The absolute name, its case kept.
fn parse_name(s: &str) -> io::Result<Name> {
    let s = s.trim();
    let absolute = if s.ends_with('.') {
        s.to_owned()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(absolute).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad DNS name {s:?}: {e}"),
        )
    })
}

/// For the `add_*` methods: a bad name is a mistake in the test.
fn name(s: &str) -> Name {
    parse_name(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The reverse-lookup name of an address (in-addr.arpa or ip6.arpa), with
/// the trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

impl DnsServer {
    /// Binds UDP and TCP on 127.0.0.1, on one free port, and serves.
    pub async fn start() -> io::Result<DnsServer> {
        Self::start_at("127.0.0.1:0".parse().map_err(io::Error::other)?).await
    }

    /// Binds UDP and TCP on `at` (port 0: one free port for both) and
    /// serves. A benchmark binds port 53 for a peer that can only ask there.
    pub async fn start_at(at: SocketAddr) -> io::Result<DnsServer> {
        let soa = SOA::new(
            parse_name("ns.test")?,
            parse_name("hostmaster.test")?,
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        );
        // The OS picks a free TCP port; UDP's may be taken: then try again.
        let mut last = None;
        for _ in 0..10 {
            let tcp = TcpListener::bind(at).await?;
            let addr = tcp.local_addr()?;
            let udp = match UdpSocket::bind(addr).await {
                Ok(udp) => udp,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let shared = Arc::new(Shared {
                zone: Mutex::new(Zone::default()),
                ttl: AtomicU32::new(DEFAULT_TTL),
                answered: AtomicUsize::new(0),
                soa,
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
        Err(last.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
    }

    /// Where it listens, UDP and TCP: 127.0.0.1 and its port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TTL of answers from now on (default [`DEFAULT_TTL`]).
    pub fn set_ttl(&self, ttl: u32) {
        self.shared.ttl.store(ttl, Ordering::Relaxed);
    }

    fn add(&self, owner: &str, data: RData) {
        self.shared
            .zone()
            .records
            .entry(key(owner))
            .or_default()
            .push(data);
    }

    /// One TXT record (each call adds one more); text over 255 bytes is split
    /// into 255-byte strings, as DNS requires (readers join them).
    pub fn add_txt(&self, owner: &str, text: &str) {
        let mut chunks: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        if chunks.is_empty() {
            chunks.push(b"");
        }
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

    /// A PTR record at the reverse name of `ip` (see [`reverse_name`]).
    pub fn add_ptr(&self, ip: IpAddr, target: &str) {
        self.add(&reverse_name(ip), RData::PTR(PTR(name(target))));
    }

    /// From now on, queries for `owner` (any type) fail this way.
    pub fn set_fault(&self, owner: &str, fault: Fault) {
        self.shared.zone().faults.insert(key(owner), fault);
    }

    /// Queries for `owner` are answered normally again.
    pub fn clear_fault(&self, owner: &str) {
        self.shared.zone().faults.remove(&key(owner));
    }

    /// Removes every record and fault (the TTL and the count stay).
    pub fn clear(&self) {
        *self.shared.zone() = Zone::default();
    }

    /// How many queries were answered so far (a Timeout fault answers none;
    /// a truncated UDP answer and the TCP retry count as two).
    pub fn queries(&self) -> usize {
        self.shared.answered.load(Ordering::Relaxed)
    }
}

/// The answer to one packet; None: stay silent.
fn answer(packet: &[u8], shared: &Shared, over_tcp: bool) -> Option<Vec<u8>> {
    // Garbage, and answers (which a query must never provoke), are ignored.
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = request.metadata.id;
    let mut response = if request.metadata.op_code != OpCode::Query {
        Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp)
    } else if request.queries.len() != 1 {
        Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
    } else {
        let query = &request.queries[0];
        let mut response = Message::response(id, OpCode::Query);
        response.metadata.authoritative = true;
        response.add_query(query.clone());
        let zone = shared.zone();
        let owner = key(&query.name().to_ascii());
        match zone.faults.get(&owner) {
            Some(Fault::Timeout) => return None,
            Some(Fault::ServFail) => response.metadata.response_code = ResponseCode::ServFail,
            Some(Fault::Refused) => response.metadata.response_code = ResponseCode::Refused,
            Some(Fault::Truncate | Fault::TruncateTcpSilent) if !over_tcp => {
                response.metadata.truncation = true
            }
            Some(Fault::TruncateTcpSilent) => return None,
            Some(Fault::Truncate | Fault::Slow(_)) | None => {
                fill(&mut response, &zone, &owner, query, shared)
            }
        }
        response
    };
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let mut bytes = response.to_vec().ok()?;
    let limit = usize::from(request.max_payload()).min(MAX_UDP_ANSWER);
    if !over_tcp && bytes.len() > limit {
        // Too large for UDP: the header, the question and the TC bit only.
        bytes = response.truncate().to_vec().ok()?;
    }
    shared.answered.fetch_add(1, Ordering::Relaxed);
    Some(bytes)
}

/// The answer section, or the negative answer, for one question.
fn fill(response: &mut Message, zone: &Zone, owner: &str, query: &Query, shared: &Shared) {
    let ttl = shared.ttl.load(Ordering::Relaxed);
    let wanted = query.query_type();
    let matching = zone
        .records
        .get(owner)
        .into_iter()
        .flatten()
        .filter(|r| wanted == RecordType::ANY || r.record_type() == wanted);
    // The owner as asked: resolvers that randomise the case check it.
    for r in matching {
        response.add_answer(Record::from_rdata(query.name().clone(), ttl, r.clone()));
    }
    if response.answers.is_empty() {
        if !zone.exists(owner) {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        // No zones here: the SOA stands at the parent of the name asked.
        let apex = query.name().base_name();
        let soa = RData::SOA(shared.soa.clone());
        response.add_authority(Record::from_rdata(apex, NEGATIVE_TTL, soa));
    }
}

/// How long to hold the answer to this packet back (`Fault::Slow`).
fn delay(packet: &[u8], shared: &Shared) -> Option<std::time::Duration> {
    let request = Message::from_vec(packet).ok()?;
    let query = request.queries.first()?;
    match shared.zone().faults.get(&key(&query.name().to_ascii())) {
        Some(Fault::Slow(d)) => Some(*d),
        _ => None,
    }
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65535];
    // Slow answers wait in tasks of their own, so others are not held up;
    // they end with the server.
    let mut slow = JoinSet::new();
    loop {
        // Errors here are about one datagram (or a stray ICMP message).
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(reply) = answer(&buf[..n], &shared, false) else {
            continue;
        };
        match delay(&buf[..n], &shared) {
            Some(d) => {
                let socket = socket.clone();
                slow.spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = socket.send_to(&reply, peer).await;
                });
            }
            None => {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
        while slow.try_join_next().is_some() {}
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    // The connections live in the set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
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

/// Queries one after the other on one connection, each with its 2-byte
/// length in front, until the client closes it.
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
        if let Some(d) = delay(&packet, &shared) {
            tokio::time::sleep(d).await;
        }
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// Sends one query (recursion desired, EDNS with a 1232-byte payload, as
/// hickory's resolver does) and returns the parsed answer, over UDP or TCP.
/// It waits as long as it takes: wrap it in a timeout where the server may
/// stay silent.
pub async fn query(
    server: SocketAddr,
    owner: &str,
    rtype: RecordType,
    tcp: bool,
) -> io::Result<Message> {
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(parse_name(owner)?, rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    exchange(server, &msg, tcp).await
}

/// Sends any message and returns the parsed answer with the same id (other
/// datagrams are skipped). For queries [`query`] cannot build.
pub async fn exchange(server: SocketAddr, msg: &Message, tcp: bool) -> io::Result<Message> {
    let packet = msg.to_vec().map_err(io::Error::other)?;
    let decode = |b: &[u8]| Message::from_vec(b).map_err(io::Error::other);
    if tcp {
        let mut s = TcpStream::connect(server).await?;
        let len = u16::try_from(packet.len()).map_err(io::Error::other)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&packet);
        s.write_all(&framed).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await?;
        return decode(&buf);
    }
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv6Addr::LOCALHOST, 0).into()
    };
    let s = UdpSocket::bind(local).await?;
    // Connected: a closed port is reported (connection refused), not waited on.
    s.connect(server).await?;
    s.send(&packet).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).await?;
        if let Ok(reply) = decode(&buf[..n])
            && reply.metadata.id == msg.metadata.id
        {
            return Ok(reply);
        }
    }
}

/// A query id that differs between queries (no need for real randomness).
fn rand_id() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Spread out, and seeded by the process id so test binaries differ.
    (n.wrapping_mul(40503)
        .wrapping_add(std::process::id() as usize)
        & 0xffff) as u16
}
