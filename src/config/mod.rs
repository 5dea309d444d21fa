//! The configuration file: one YAML document read into typed structs.
//!
//! Unknown keys are rejected, every value is validated while it is read, and
//! every error names the file, line and column. Every option has a default;
//! `etc/mxguard.yaml` shows each one with a comment and `mxguard.yaml(5)`
//! documents it.

mod store;
mod values;

pub use store::{OnError, StoreBackend, StoreConfig, redact_in, redact_url};
pub use values::{Duration, IpNet, ListenAddr, Size};

use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
};
use thiserror::Error;

/// Where the daemon looks for its configuration when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/mxguard/mxguard.yaml";

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub milter: MilterConfig,
    pub policy: PolicyConfig,
    pub socketmap: SocketmapConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub dns: DnsConfig,
    pub log: LogConfig,
    pub mode: Mode,
    /// Name this host gives itself in the headers it adds; empty: the system host name.
    pub hostname: String,
    /// How long a stopping daemon waits for sessions in flight.
    pub shutdown_timeout: Duration,
    pub local_domains: Vec<String>,
    pub domains: BTreeMap<String, DomainConfig>,
    pub srs: SrsConfig,
    pub greylist: GreylistConfig,
    pub allowlist: AllowlistConfig,
    pub denylist: DenylistConfig,
    pub ratelimit: RatelimitConfig,
    pub backscatter: BackscatterConfig,
    pub auth: AuthConfig,
    pub arc: ArcConfig,
    pub content: ContentConfig,
    pub webhooks: WebhooksConfig,
}

/// A section whose options a later release defines; for now it takes no keys,
/// so a misplaced option is reported rather than silently ignored.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Section {}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MilterConfig {
    /// `inet:HOST:PORT` or `unix:/PATH`; `null` turns the milter front end off.
    pub listen: Option<ListenAddr>,
    /// Permissions of a unix socket file (octal).
    pub socket_mode: SocketMode,
    /// Group a unix socket file is given after bind; `null` leaves it alone.
    pub socket_group: Option<String>,
    /// Run the envelope checks in the milter's RCPT callback.
    pub envelope_checks: EnvelopeChecks,
    /// Add the `X-Mxguard` trace header to every accepted message.
    pub trace_header: bool,
    pub max_connections: usize,
    /// Close a milter connection on which Postfix sends nothing for this long.
    pub idle_timeout: Duration,
}

impl Default for MilterConfig {
    fn default() -> Self {
        Self {
            listen: Some(ListenAddr::Unix("/run/mxguard/milter.sock".into())),
            socket_mode: SocketMode(0o666),
            socket_group: None,
            envelope_checks: EnvelopeChecks::Auto,
            trace_header: true,
            max_connections: 1000,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Whether the milter runs the envelope checks itself.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EnvelopeChecks {
    /// Only when the policy front end is off: a site that wires both runs each
    /// envelope check once, in the policy front end.
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// `inet:HOST:PORT` or `unix:/PATH`; `null` turns the policy front end off.
    pub listen: Option<ListenAddr>,
    pub socket_mode: SocketMode,
    /// Group a unix socket file is given after bind; `null` leaves it alone.
    pub socket_group: Option<String>,
    /// Clients (IP addresses or CIDR blocks) refused with 554 5.7.1.
    pub reject_clients: Vec<IpNet>,
    pub max_connections: usize,
    /// Postfix keeps policy connections open between requests; close one that
    /// has been idle this long (Postfix reconnects when it needs to).
    pub idle_timeout: Duration,
    /// Longest `name=value` line accepted; a longer one closes the connection.
    pub max_line_length: usize,
    /// Most attributes in one request; more close the connection.
    pub max_attributes: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            listen: Some(ListenAddr::Inet {
                host: "127.0.0.1".into(),
                port: 10040,
            }),
            socket_mode: SocketMode(0o666),
            socket_group: None,
            reject_clients: Vec::new(),
            max_connections: 1000,
            idle_timeout: Duration::from_secs(600),
            max_line_length: 4096,
            max_attributes: 128,
        }
    }
}

/// Postfix `socketmap:` tables: `domains` (for `relay_domains`) and
/// `transport` (for `transport_maps`, custom ports).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SocketmapConfig {
    /// `inet:HOST:PORT` or `unix:/PATH`; off unless set.
    pub listen: Option<ListenAddr>,
    pub socket_mode: SocketMode,
    /// Group a unix socket file is given after bind; `null` leaves it alone.
    pub socket_group: Option<String>,
    pub max_connections: usize,
    /// Close a connection on which Postfix sends nothing for this long.
    pub idle_timeout: Duration,
    /// The Postfix transport named in `transport` answers (`smtp:DOMAIN:PORT`).
    pub transport: String,
}

impl Default for SocketmapConfig {
    fn default() -> Self {
        Self {
            listen: None,
            socket_mode: SocketMode(0o666),
            socket_group: None,
            max_connections: 100,
            idle_timeout: Duration::from_secs(600),
            transport: "smtp".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `/metrics` and `/healthz`; `null` turns the HTTP listener off.
    pub listen: Option<ListenAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some(ListenAddr::Inet {
                host: "127.0.0.1".into(),
                port: 9190,
            }),
        }
    }
}

/// Greylisting: a sender seen for the first time is asked to come back
/// after `delay`; one that does is let through for the rest of `lifetime`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GreylistConfig {
    pub enabled: bool,
    /// How long a new sender must wait before its retry is accepted.
    pub delay: Duration,
    /// How long a sender is remembered from its first sighting.
    pub lifetime: Duration,
    /// What identifies a sender.
    pub key: GreylistKey,
    /// `enforce` or `report` for this check alone; `null`: the global `mode`.
    pub mode: Option<Mode>,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            delay: Duration::from_secs(300),
            lifetime: Duration::from_secs(30 * 86_400),
            key: GreylistKey::Client,
            mode: None,
        }
    }
}

/// Clients that skip greylisting and rate limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AllowlistConfig {
    /// IP addresses, CIDR blocks, domains and top-level domains. A domain
    /// matches a client only through its verified (forward-confirmed) name.
    pub entries: Vec<AllowEntry>,
}

/// One allowlist entry: a network, or a domain (a top-level domain such as
/// `edu` allowlists every name under it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    Net(IpNet),
    Domain(String),
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(AllowEntry::Net(net));
        }
        let d = t
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if d.is_empty() || d.len() > 253 || !d.split('.').all(label_ok) || d.contains('/') {
            return Err(format!(
                "invalid allowlist entry `{s}`: expected an IP address, a CIDR block or a domain such as example.org"
            ));
        }
        Ok(AllowEntry::Domain(d))
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Net(n) => n.fmt(f),
            AllowEntry::Domain(d) => f.write_str(d),
        }
    }
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for AllowEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A list of client addresses kept in a file that another program (cron,
/// rsync of an rbldnsd zone) refreshes: plain IP addresses and CIDR blocks,
/// one per line, or rbldnsd `ip4set` text.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Named in replies, logs and metrics.
    pub name: String,
    /// A file another program refreshes...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// ...or an http(s) URL mxguard fetches itself (gzip is unpacked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How often the file is read again.
    #[serde(default = "default_feed_refresh")]
    pub refresh: Duration,
    /// How long an address that dropped out of the file stays listed.
    #[serde(default = "default_feed_grace")]
    pub grace: Duration,
}

fn default_feed_refresh() -> Duration {
    Duration::from_secs(3600)
}

fn default_feed_grace() -> Duration {
    Duration::from_secs(7 * 86_400)
}

/// Clients refused with 421 because a feed lists them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DenylistConfig {
    pub feeds: Vec<FeedConfig>,
    /// Where listed senders can ask for removal; named in the reply, with
    /// `?q=<address>` appended. Empty: the reply names the feed instead.
    pub removal_url: String,
    /// Denylisting of the attributes of messages found to be spam or viruses.
    pub auto: AutoDenyConfig,
    /// `enforce` or `report` for the denylist alone; `null`: the global `mode`.
    pub mode: Option<Mode>,
}

/// Thresholds and lifetimes of automatic denylisting (the reference's).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AutoDenyConfig {
    /// Refuse (421) transactions with a denylisted attribute.
    pub enabled: bool,
    /// Spam findings after which an address (sender, From) is denylisted.
    pub spam_threshold_address: u64,
    /// Spam findings after which any attribute is denylisted.
    pub spam_threshold: u64,
    /// Virus findings after which an address is denylisted.
    pub virus_threshold: u64,
    /// How long a count lives, for clients not allowlisted and allowlisted.
    pub counter_lifetime: Duration,
    pub counter_lifetime_allowlisted: Duration,
    /// How long an attribute stays denylisted.
    pub lifetime: Duration,
}

impl Default for AutoDenyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            spam_threshold_address: 5,
            spam_threshold: 10,
            virus_threshold: 3,
            counter_lifetime: Duration::from_secs(5 * 86_400),
            counter_lifetime_allowlisted: Duration::from_secs(86_400),
            lifetime: Duration::from_secs(30 * 86_400),
        }
    }
}

/// Bounces (null or postmaster-style senders) refused with 554 from clients
/// a backscatter feed lists.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackscatterConfig {
    /// `null` turns the check off.
    pub feed: Option<FeedConfig>,
    /// `enforce` or `report` for this check alone; `null`: the global `mode`.
    pub mode: Option<Mode>,
}

/// Limits on how much one client may send.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RatelimitConfig {
    /// Most recipients in one message; the next one gets 452 4.5.3.
    pub max_recipients: u32,
    /// Most messages from one client (root domain of its verified name, else
    /// its address) to one recipient per `window`; 0 turns it off.
    pub messages_per_recipient: u64,
    pub window: Duration,
    /// Most SMTP connections at once from one client address (milter front
    /// end only: the policy protocol sees no connection end); 0 turns it off.
    pub concurrent_connections: u64,
    /// Daily budgets per client (root domain of its verified name, else its
    /// address), checked at the end of each message by the milter; 0: none.
    pub daily_messages: u64,
    pub daily_bytes: Size,
    /// The same for allowlisted clients.
    pub daily_messages_allowlisted: u64,
    pub daily_bytes_allowlisted: Size,
    /// `enforce` or `report` for these limits alone; `null`: the global `mode`.
    pub mode: Option<Mode>,
}

impl Default for RatelimitConfig {
    fn default() -> Self {
        Self {
            max_recipients: 50,
            messages_per_recipient: 100,
            window: Duration::from_secs(3600),
            concurrent_connections: 10,
            daily_messages: 0,
            daily_bytes: Size(0),
            daily_messages_allowlisted: 0,
            daily_bytes_allowlisted: Size(0),
            mode: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GreylistKey {
    /// The root domain of the client's verified (forward-confirmed) name,
    /// else its address: every host of one organisation shares a timer.
    #[default]
    Client,
    /// The client address only (IPv6 by its /64).
    Ip,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// `IP` or `IP:PORT` (IPv6 as `[IP]:PORT`); empty: the system resolver.
    pub nameservers: Vec<String>,
    pub timeout: Duration,
    /// Answers kept in the resolver's cache (each for its TTL).
    pub cache_size: u64,
    /// Longest a negative answer (NXDOMAIN, no data) is kept.
    pub negative_ttl_max: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            cache_size: 8192,
            negative_ttl_max: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `debug`, `mxguard=debug,indymilter=info`, …
    /// The environment variable `MXGUARD_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// `enforce` tells Postfix each decision; `report` logs and counts every
/// decision but tells Postfix to go on (a dry run).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Report,
}

/// A domain mxguard forwards for. The key `"*"` with `source: dns` makes
/// every domain with `forward-email=` TXT records one (off unless written).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DomainConfig {
    pub source: DomainSource,
    /// Rules in the grammar of `forward-email=` TXT records (`source: config`).
    pub rules: Vec<String>,
    /// SMTP port forwarded mail goes out to, as `forward-email-port=` does
    /// for DNS rules (`source: config`); unset: 25.
    pub port: Option<u16>,
    /// Most addresses one alias may forward to.
    pub max_forwarded: usize,
    /// HMAC-SHA256 key for the `X-Webhook-Signature` of this domain's
    /// webhooks; empty: `webhooks.key`.
    pub webhook_key: String,
    /// Where the members come from (`source: roster`).
    pub roster: Option<RosterConfig>,
}

/// A membership roster: a JSON or YAML list of members, each with a user
/// name, a forwarding address and attributes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RosterConfig {
    /// An http(s) URL of the roster.
    pub url: Option<String>,
    /// A local roster file (JSON or YAML).
    pub path: Option<PathBuf>,
    /// The member field holding the user name (the local part).
    pub username_field: String,
    /// The member field holding the forwarding address.
    pub forward_field: String,
    /// Attribute values a member must have (a list attribute must contain
    /// the value), e.g. `{ is_valid: "true", team: "debian" }`.
    pub require: BTreeMap<String, String>,
    /// User names never provisioned.
    pub banned: Vec<String>,
    /// How often the roster is read again.
    pub refresh: Duration,
    /// A sync that would remove more than this fraction of the members is
    /// refused unless forced.
    pub max_drop: f64,
    /// An http(s) URL that gets a JSON POST with the addresses a sync adds.
    pub notify_webhook: String,
}

impl Default for RosterConfig {
    fn default() -> Self {
        Self {
            url: None,
            path: None,
            username_field: "username".into(),
            forward_field: "forward".into(),
            require: BTreeMap::new(),
            banned: Vec::new(),
            refresh: Duration::from_secs(600),
            max_drop: 0.2,
            notify_webhook: String::new(),
        }
    }
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            source: DomainSource::Config,
            rules: Vec::new(),
            port: None,
            max_forwarded: crate::aliases::DEFAULT_MAX_FORWARDED,
            webhook_key: String::new(),
            roster: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DomainSource {
    #[default]
    Config,
    Dns,
    /// Aliases provisioned from a membership roster (`roster:`).
    Roster,
}

/// The end-of-message content rules; each can be switched off.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ContentConfig {
    /// Largest message (headers and body) accepted, and kept in memory;
    /// 0: no limit of mxguard's (Postfix's message_size_limit still holds).
    pub max_message_size: Size,
    /// Largest header section accepted; the end-of-message decisions see
    /// every header up to it, and a larger one is refused rather than
    /// partly ignored. 0: no limit of its own.
    pub max_header_size: Size,
    /// Exactly one valid address in exactly one From header.
    pub require_from: bool,
    /// Most Received headers before the message counts as looping; 0: off.
    pub max_received: usize,
    /// Refuse the GTUBE test string.
    pub gtube: bool,
    /// Refuse the reference's extortion and phishing subjects.
    pub spam_subjects: bool,
    /// Refuse a message (by fingerprint) retried for longer than this; null: off.
    pub max_retry_period: Option<Duration>,
    pub mode: Option<Mode>,
}

impl Default for ContentConfig {
    fn default() -> Self {
        Self {
            max_message_size: Size(52_428_800),
            max_header_size: Size(256 * 1024),
            require_from: true,
            max_received: 25,
            gtube: true,
            spam_subjects: true,
            max_retry_period: Some(Duration::from_secs(5 * 86_400)),
            mode: None,
        }
    }
}

/// SPF, DKIM, ARC and DMARC at the end of the message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Verify and add Authentication-Results.
    pub enabled: bool,
    /// The authserv-id of Authentication-Results; empty: `hostname`.
    pub authserv_id: String,
    /// Refuse DMARC failures of domains with `p=reject`.
    pub dmarc_reject: bool,
    /// Refuse SPF hard failures without an aligned DKIM signature.
    pub spf_reject: bool,
    /// ARC sealers (the `d=` of the latest ARC-Seal) whose passing chain
    /// overrides a DMARC failure.
    pub trusted_arc_sealers: Vec<String>,
    /// Rewrite From on forwarded mail that would fail DMARC at the target.
    pub friendly_from: bool,
    /// The address friendly-from puts in From; empty: `noreply@HOSTNAME`.
    pub friendly_from_address: String,
    /// From domains friendly-from leaves alone.
    pub friendly_from_exempt: Vec<String>,
    pub mode: Option<Mode>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            authserv_id: String::new(),
            dmarc_reject: true,
            spf_reject: true,
            trusted_arc_sealers: Vec::new(),
            friendly_from: true,
            friendly_from_address: String::new(),
            friendly_from_exempt: Vec::new(),
            mode: None,
        }
    }
}

/// ARC sealing of forwarded messages.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ArcConfig {
    /// The signing domain (`d=`); empty: no sealing.
    pub domain: String,
    /// The selector (`s=`), published at SELECTOR._domainkey.DOMAIN.
    pub selector: String,
    /// A PEM private key: Ed25519 (PKCS#8) or RSA (PKCS#1 or PKCS#8).
    pub key_file: Option<PathBuf>,
}

/// The Sender Rewriting Scheme, in postsrsd's format.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SrsConfig {
    /// The domain of SRS addresses; empty: no SRS.
    pub domain: String,
    /// One secret per line: the first signs, all verify.
    pub secrets_file: Option<PathBuf>,
    /// Characters of the hash in new addresses.
    pub hash_length: usize,
    /// How long an SRS address can be reversed (whole days).
    pub max_age: Duration,
    /// The character after `SRS0`/`SRS1`: `=`, `-` or `+`.
    pub separator: char,
    /// Read from `secrets_file` when the configuration is loaded.
    #[serde(skip)]
    pub secrets: Vec<Vec<u8>>,
}

impl Default for SrsConfig {
    fn default() -> Self {
        Self {
            domain: String::new(),
            secrets_file: None,
            hash_length: 4,
            max_age: Duration::from_secs(21 * 86_400),
            separator: '=',
            secrets: Vec::new(),
        }
    }
}

impl SrsConfig {
    pub fn enabled(&self) -> bool {
        !self.domain.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !crate::aliases::grammar::is_fqdn(&self.domain.to_lowercase()) {
            return Err(format!("srs.domain `{}` is not a domain name", self.domain));
        }
        if self.secrets_file.is_none() {
            return Err("srs.domain is set but srs.secrets_file is not: SRS needs a secret".into());
        }
        if !(4..=27).contains(&self.hash_length) {
            return Err(format!(
                "srs.hash_length is {}: it must be 4 to 27",
                self.hash_length
            ));
        }
        if !['=', '-', '+'].contains(&self.separator) {
            return Err(format!(
                "srs.separator `{}` must be one of = - +",
                self.separator
            ));
        }
        if self.max_age.get().as_secs() < 86_400 {
            return Err("srs.max_age must be at least 1d".into());
        }
        Ok(())
    }

    /// Reads the secrets file (when SRS is on).
    pub fn load_secrets(&mut self) -> Result<(), String> {
        let Some(path) = self.secrets_file.as_ref().filter(|_| self.enabled()) else {
            return Ok(());
        };
        let text = fs::read_to_string(path)
            .map_err(|e| format!("srs.secrets_file {}: {e}", path.display()))?;
        self.secrets = crate::srs::parse_secrets(&text);
        if self.secrets.is_empty() {
            return Err(format!(
                "srs.secrets_file {} holds no secret",
                path.display()
            ));
        }
        Ok(())
    }
}

/// HTTP POSTs to forwarding targets that are http(s) URLs.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Whole request, per attempt.
    pub timeout: Duration,
    /// Attempts after the first, 2 s apart, for failures worth retrying.
    pub retries: u32,
    /// Allow URLs on loopback, private and link-local addresses.
    pub allow_private: bool,
    /// HMAC-SHA256 key of the `X-Webhook-Signature` header; empty: unsigned.
    pub key: String,
    /// Largest message kept in memory to be posted.
    pub max_message_size: Size,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            retries: 3,
            allow_private: false,
            key: String::new(),
            max_message_size: Size(52_428_800),
        }
    }
}

/// A file mode written in octal, as a string (`"0660"`) or a number (`0660`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML reads an unquoted 0660 as the decimal 660, so both forms are
        // taken as octal digits.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        let digits = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Str(s) => s,
        };
        u32::from_str_radix(digits.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(SocketMode)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid socket mode `{digits}`: expected octal such as 0660"
                ))
            })
    }
}

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:04o}", self.0))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            milter: MilterConfig::default(),
            policy: PolicyConfig::default(),
            socketmap: SocketmapConfig::default(),
            http: HttpConfig::default(),
            store: StoreConfig::default(),
            dns: DnsConfig::default(),
            log: LogConfig::default(),
            mode: Mode::Enforce,
            hostname: String::new(),
            shutdown_timeout: Duration::from_secs(30),
            local_domains: Vec::new(),
            domains: BTreeMap::new(),
            srs: SrsConfig::default(),
            greylist: GreylistConfig::default(),
            allowlist: AllowlistConfig::default(),
            denylist: DenylistConfig::default(),
            ratelimit: RatelimitConfig::default(),
            backscatter: BackscatterConfig::default(),
            auth: AuthConfig::default(),
            arc: ArcConfig::default(),
            content: ContentConfig::default(),
            webhooks: WebhooksConfig::default(),
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// [`Config::load`] for a reload: a file that holds no setting (empty,
    /// or comments only) is refused. Taken, it would put every default in
    /// force (greylisting, say) on a running site, and such a file is far
    /// more often one caught half-written than a wish for the defaults.
    pub fn load_for_reload(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        if let Ok(None | Some(serde_yaml::Value::Null)) =
            serde_yaml::from_str::<Option<serde_yaml::Value>>(&text)
        {
            return Err(ConfigError::Invalid {
                path: origin,
                message: "the file holds no settings (an empty file means every default only \
                          at start, never on a reload)"
                    .into(),
            });
        }
        Self::parse(&text, &origin)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // An empty file, or one holding only comments, means "all defaults".
        let mut config = serde_yaml::from_str::<Option<Config>>(text)
            .map_err(|e| syntax_error(origin, &e))?
            .unwrap_or_default();
        let invalid = |message| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        config.validate().map_err(invalid)?;
        config.srs.load_secrets().map_err(invalid)?;
        crate::checks::auth::Sealer::from_config(&config.arc).map_err(invalid)?;
        Ok(config)
    }

    /// Checks that involve more than one value.
    fn validate(&self) -> Result<(), String> {
        let listeners = [
            ("milter.listen", &self.milter.listen),
            ("policy.listen", &self.policy.listen),
            ("socketmap.listen", &self.socketmap.listen),
            ("http.listen", &self.http.listen),
        ];
        for (i, (name_a, a)) in listeners.iter().enumerate() {
            for (name_b, b) in &listeners[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && a == b
                    && !matches!(a, ListenAddr::Inet { port: 0, .. })
                {
                    return Err(format!(
                        "{name_a} and {name_b} are both {a}: each front end needs its own socket"
                    ));
                }
            }
        }
        if let Some(ListenAddr::Unix(p)) = &self.http.listen {
            return Err(format!(
                "http.listen is unix:{}: the HTTP listener takes HOST:PORT only",
                p.display()
            ));
        }
        // Whether the group exists is a fact of the host, checked at start.
        for (name, group) in [
            ("milter.socket_group", &self.milter.socket_group),
            ("policy.socket_group", &self.policy.socket_group),
            ("socketmap.socket_group", &self.socketmap.socket_group),
        ] {
            if let Some(g) = group
                && (g.is_empty() || g.contains(['\0', ':', '/']) || g.contains(char::is_whitespace))
            {
                return Err(format!(
                    "{name} `{g}` is not a group name: give a name such as postfix, or null"
                ));
            }
        }
        for (name, n) in [
            ("milter.max_connections", self.milter.max_connections),
            ("policy.max_connections", self.policy.max_connections),
        ] {
            if n == 0 {
                return Err(format!("{name} is 0: it must be at least 1"));
            }
        }
        if self.policy.max_line_length < 512 {
            return Err(format!(
                "policy.max_line_length is {}: it must be at least 512, or Postfix's ordinary requests are refused",
                self.policy.max_line_length
            ));
        }
        if self.policy.max_attributes < 32 {
            return Err(format!(
                "policy.max_attributes is {}: it must be at least 32, or Postfix's ordinary requests are refused",
                self.policy.max_attributes
            ));
        }
        if self
            .hostname
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "hostname `{}` contains white space or control characters",
                self.hostname.escape_debug()
            ));
        }
        self.store.validate()?;
        for d in &self.local_domains {
            if !matches!(d.parse::<AllowEntry>(), Ok(AllowEntry::Domain(_))) {
                return Err(format!("local_domains: `{d}` is not a domain name"));
            }
        }
        if self.socketmap.transport.is_empty()
            || !self
                .socketmap
                .transport
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "socketmap.transport `{}` is not a Postfix transport name",
                self.socketmap.transport.escape_debug()
            ));
        }
        self.srs.validate()?;
        if !self.arc.domain.is_empty() {
            if !crate::aliases::grammar::is_fqdn(&self.arc.domain.to_lowercase()) {
                return Err(format!(
                    "arc.domain `{}` is not a domain name",
                    self.arc.domain
                ));
            }
            if self.arc.selector.is_empty() || self.arc.key_file.is_none() {
                return Err(
                    "arc.domain is set: arc.selector and arc.key_file are needed too".into(),
                );
            }
        }
        if self
            .auth
            .friendly_from_address
            .contains(|c: char| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err("auth.friendly_from_address must be a bare address".into());
        }
        if self.webhooks.retries > 10 {
            return Err(format!(
                "webhooks.retries is {}: at most 10, or Postfix gives up on the milter first",
                self.webhooks.retries
            ));
        }
        if self.webhooks.timeout.get() < std::time::Duration::from_secs(1) {
            return Err("webhooks.timeout must be at least 1s".into());
        }
        for (name, d) in &self.domains {
            let wildcard = name == "*";
            if !wildcard && !crate::aliases::grammar::is_fqdn(&name.to_lowercase()) {
                return Err(format!(
                    "domains: `{name}` is not a domain name (or `*` for DNS rules of any domain)"
                ));
            }
            if wildcard && d.source != DomainSource::Dns {
                return Err("domains: `*` needs `source: dns`".into());
            }
            if d.source == DomainSource::Dns && (!d.rules.is_empty() || d.port.is_some()) {
                return Err(format!(
                    "domains.{name}: `rules` and `port` are for `source: config`; with `source: dns` they come from the TXT records"
                ));
            }
            match (d.source, &d.roster) {
                (DomainSource::Roster, None) => {
                    return Err(format!("domains.{name}: `source: roster` needs `roster:`"));
                }
                (DomainSource::Roster, Some(r)) => {
                    if r.url.is_some() == r.path.is_some() {
                        return Err(format!(
                            "domains.{name}.roster: give exactly one of url and path"
                        ));
                    }
                    if let Some(u) = &r.url
                        && !(u.starts_with("http://") || u.starts_with("https://"))
                    {
                        return Err(format!(
                            "domains.{name}.roster.url `{u}` must be http:// or https://"
                        ));
                    }
                    if !(0.0..=1.0).contains(&r.max_drop) {
                        return Err(format!(
                            "domains.{name}.roster.max_drop must be between 0 and 1"
                        ));
                    }
                    if !d.rules.is_empty() {
                        return Err(format!("domains.{name}: `rules` are for `source: config`"));
                    }
                }
                (_, Some(_)) => {
                    return Err(format!("domains.{name}: `roster:` needs `source: roster`"));
                }
                _ => {}
            }
            if d.port == Some(0) {
                return Err(format!("domains.{name}.port: 0 is not a port"));
            }
            if d.max_forwarded == 0 {
                return Err(format!(
                    "domains.{name}.max_forwarded is 0: it must be at least 1"
                ));
            }
            let set = crate::aliases::RuleSet::from_rules(
                &d.rules,
                d.port,
                &crate::aliases::Limits::operator(d.rules.len()),
            );
            if let Some(e) = set.errors.first() {
                return Err(format!("domains.{name}.rules: {e}"));
            }
        }
        let feeds = self.denylist.feeds.iter().chain(&self.backscatter.feed);
        let mut names = std::collections::BTreeSet::new();
        for f in feeds {
            if f.name.is_empty() || f.name.contains(|c: char| c.is_control()) {
                return Err(format!(
                    "feed `{}`: a feed needs a printable name",
                    f.name.escape_debug()
                ));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("feed name `{}` is used twice", f.name));
            }
            match (&f.path, &f.url) {
                (Some(p), None) if p.is_absolute() => {}
                (Some(p), None) => {
                    return Err(format!(
                        "feed `{}`: path {} must be absolute",
                        f.name,
                        p.display()
                    ));
                }
                (None, Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {}
                (None, Some(u)) => {
                    return Err(format!(
                        "feed `{}`: url `{u}` must be http:// or https://",
                        f.name
                    ));
                }
                _ => {
                    return Err(format!(
                        "feed `{}`: give exactly one of path and url",
                        f.name
                    ));
                }
            }
        }
        if self
            .denylist
            .removal_url
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err("denylist.removal_url must not contain white space".into());
        }
        if self.ratelimit.max_recipients == 0 {
            return Err("ratelimit.max_recipients is 0: it must be at least 1".into());
        }
        if self.greylist.lifetime <= self.greylist.delay {
            return Err(format!(
                "greylist.lifetime ({}) must be longer than greylist.delay ({}), or no retry could ever pass",
                self.greylist.lifetime, self.greylist.delay
            ));
        }
        for ns in &self.dns.nameservers {
            parse_nameserver(ns).map_err(|e| format!("dns.nameservers: {e}"))?;
        }
        Ok(())
    }

    /// The effective configuration as YAML, as `check-config` prints it.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

/// `IP` (port 53) or `IP:PORT`, IPv6 as `[IP]:PORT` or a bare IPv6 address.
pub fn parse_nameserver(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse().map_err(|_| {
        format!("invalid name server `{s}`: expected IP or IP:PORT, e.g. 127.0.0.1:5353")
    })
}

fn syntax_error(origin: &str, e: &serde_yaml::Error) -> ConfigError {
    let full = e.to_string();
    match e.location() {
        Some(loc) => {
            // serde_yaml appends " at line L column C"; the location is given
            // up front instead, in the file:line:column form editors follow.
            let message = full
                .rsplit_once(" at line ")
                .map_or(full.as_str(), |(m, _)| m)
                .to_owned();
            ConfigError::Syntax {
                path: origin.to_owned(),
                line: loc.line(),
                column: loc.column(),
                message,
            }
        }
        None => ConfigError::Invalid {
            path: origin.to_owned(),
            message: full,
        },
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text, "t.yaml") {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_reload_refuses_a_file_with_no_settings() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mxguard.yaml");
        for blank in ["", "\n", "# only a comment\n", "~\n", "---\n"] {
            fs::write(&path, blank)?;
            assert!(
                Config::load(&path).is_ok(),
                "{blank:?} is all defaults at start"
            );
            let e = Config::load_for_reload(&path).map_err(|e| e.to_string());
            assert!(
                e.as_ref().is_err_and(|e| e.contains("holds no settings")),
                "{blank:?}: {e:?}"
            );
        }
        fs::write(&path, "mode: report\n")?;
        assert_eq!(Config::load_for_reload(&path)?.mode, Mode::Report);
        fs::write(&path, "mode: [\n")?;
        let e = Config::load_for_reload(&path).map_err(|e| e.to_string());
        assert!(
            e.is_err_and(|e| e.contains("mxguard.yaml:")),
            "syntax errors as before"
        );
        Ok(())
    }

    #[test]
    fn empty_file_means_defaults() -> Result<(), ConfigError> {
        assert_eq!(Config::parse("", "t.yaml")?, Config::default());
        assert_eq!(
            Config::parse("# only a comment\n", "t.yaml")?,
            Config::default()
        );
        Ok(())
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = err("milter:\n  listen: inet:127.0.0.1:1\n  lisen: x\n");
        assert!(
            e.starts_with("t.yaml:3:3: milter: unknown field `lisen`, expected one of"),
            "{e}"
        );
        let e = err("srs: { enabled: true }\n");
        assert!(
            e.starts_with("t.yaml:1:8: srs: unknown field `enabled`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        let e = err("policy:\n  reject_clients: [192.0.2.0/33]\n");
        assert!(e.starts_with("t.yaml:2:"), "{e}");
        assert!(e.contains("the prefix length is larger than 32"), "{e}");
        let e = err("shutdown_timeout: 10\n");
        assert!(
            e.contains("invalid duration `10`: expected a whole number and a unit"),
            "{e}"
        );
        let e = err("shutdown_timeout: 10 minutes\n");
        assert!(e.contains("invalid duration `10 minutes`"), "{e}");
        let e = err("mode: loud\n");
        assert!(
            e.contains("unknown variant `loud`, expected `enforce` or `report`"),
            "{e}"
        );
        let e = err("milter: { listen: \"unix:milter.sock\" }\n");
        assert!(e.contains("must be absolute"), "{e}");
    }

    #[test]
    fn cross_checks() {
        let e = err("milter: { listen: \"inet:127.0.0.1:10040\" }\n");
        assert_eq!(
            e,
            "t.yaml: milter.listen and policy.listen are both inet:127.0.0.1:10040: each front end needs its own socket"
        );
        let e = err("policy: { max_line_length: 100 }\n");
        assert!(e.contains("must be at least 512"), "{e}");
        let e = err("dns: { nameservers: [\"nowhere\"] }\n");
        assert!(e.contains("invalid name server `nowhere`"), "{e}");
    }

    #[test]
    fn a_feed_has_a_path_or_a_url() {
        let e = err("denylist: { feeds: [{ name: a, path: /x, url: \"http://h/x\" }] }");
        assert!(
            e.contains("feed `a`: give exactly one of path and url"),
            "{e}"
        );
        let e = err("denylist: { feeds: [{ name: a }] }");
        assert!(e.contains("give exactly one of path and url"), "{e}");
        let e = err("denylist: { feeds: [{ name: a, url: \"ftp://h/x\" }] }");
        assert!(e.contains("must be http:// or https://"), "{e}");
        let e = err("denylist: { feeds: [{ name: a, path: x }, { name: a, path: /y }] }");
        assert!(
            e.contains("must be absolute") || e.contains("used twice"),
            "{e}"
        );
        let e = err("denylist: { feeds: [{ name: a, path: /x }, { name: a, path: /y }] }");
        assert!(e.contains("feed name `a` is used twice"), "{e}");
    }

    #[test]
    fn socket_modes() -> Result<(), ConfigError> {
        assert_eq!(
            Config::parse("milter: { socket_mode: 0660 }", "t")?
                .milter
                .socket_mode,
            SocketMode(0o660)
        );
        assert_eq!(
            Config::parse("milter: { socket_mode: \"0600\" }", "t")?
                .milter
                .socket_mode,
            SocketMode(0o600)
        );
        assert!(err("milter: { socket_mode: 0999 }").contains("invalid socket mode"));
        Ok(())
    }

    #[test]
    fn socket_groups() -> Result<(), ConfigError> {
        let d = Config::default();
        assert_eq!(
            (
                &d.milter.socket_group,
                &d.policy.socket_group,
                &d.socketmap.socket_group
            ),
            (&None, &None, &None)
        );
        let c = Config::parse(
            "milter: { socket_group: postfix }\npolicy: { socket_group: mail }\nsocketmap: { socket_group: null }\n",
            "t",
        )?;
        assert_eq!(c.milter.socket_group.as_deref(), Some("postfix"));
        assert_eq!(c.policy.socket_group.as_deref(), Some("mail"));
        assert_eq!(c.socketmap.socket_group, None);
        // Printed and read back, the option survives.
        assert_eq!(Config::parse(&c.to_yaml(), "printed")?, c);
        assert_eq!(
            err("socketmap: { socket_group: \"\" }\n"),
            "t.yaml: socketmap.socket_group `` is not a group name: give a name such as postfix, or null"
        );
        assert!(
            err("milter: { socket_group: \"post fix\" }\n")
                .contains("milter.socket_group `post fix` is not a group name"),
        );
        assert!(err("policy: { socket_group: [postfix] }\n").contains("policy"));
        Ok(())
    }

    #[test]
    fn printed_config_reads_back_the_same() -> Result<(), ConfigError> {
        let c = Config::parse(
            "policy: { reject_clients: [192.0.2.7, 198.51.100.0/24, \"2001:db8::/32\"] }\nmode: report\nshutdown_timeout: 90s\n",
            "t",
        )?;
        assert_eq!(Config::parse(&c.to_yaml(), "printed")?, c);
        assert_eq!(
            Config::parse(&Config::default().to_yaml(), "printed")?,
            Config::default()
        );
        Ok(())
    }
}
