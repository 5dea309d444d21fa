//! Value types used in the configuration file: durations, sizes, listen
//! addresses and networks. Each one validates while it is deserialized, so a
//! bad value is reported with the line and column where it stands.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    time::Duration as StdDuration,
};

/// A duration written as a number and a unit: `250ms`, `30s`, `5m`, `2h`, `30d`, `1w`.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub fn get(self) -> StdDuration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || {
            format!(
                "invalid duration `{s}`: expected a whole number and a unit (ms, s, m, h, d or w), such as 30s, 5m or 30d"
            )
        };
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(expected)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| expected())?;
        let ms_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            _ => return Err(expected()),
        };
        let ms = n
            .checked_mul(ms_per_unit)
            .ok_or_else(|| format!("duration `{s}` is too large"))?;
        Ok(Self(StdDuration::from_millis(ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("w", 604_800_000u128),
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        if ms == 0 {
            return write!(f, "0s");
        }
        write!(f, "{ms}ms")
    }
}

/// A size in bytes written as a number and an optional unit: `512`, `64KB`, `50MB`, `1GB`.
/// KB, MB and GB are binary multiples (1 MB = 1 048 576 bytes), as in Postfix's
/// and the reference's own figures (50 MB = 52 428 800 bytes).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || {
            format!(
                "invalid size `{s}`: expected a whole number and an optional unit (B, KB, MB or GB), such as 50MB"
            )
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| expected())?;
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "KB" | "KIB" | "K" => 1 << 10,
            "MB" | "MIB" | "M" => 1 << 20,
            "GB" | "GIB" | "G" => 1 << 30,
            _ => return Err(expected()),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

/// Where a front end listens: `inet:HOST:PORT` (an IPv6 host in brackets),
/// `unix:/PATH`, or plain `HOST:PORT` as a shorthand for `inet:`.
#[derive(Clone, Debug, Eq, PartialEq, Hash)]
pub enum ListenAddr {
    Inet { host: String, port: u16 },
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "invalid socket `{s}`: a unix socket path must be absolute"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("inet:").unwrap_or(s);
        let bad = || {
            format!(
                "invalid socket `{s}`: expected inet:HOST:PORT (e.g. inet:127.0.0.1:10040, inet:[::1]:10040) or unix:/PATH"
            )
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(bad)?;
            inner.parse::<Ipv6Addr>().map_err(|_| bad())?;
            inner.to_owned()
        } else {
            if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
                return Err(bad());
            }
            host.to_owned()
        };
        Ok(Self::Inet { host, port })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet { host, port } if host.contains(':') => write!(f, "inet:[{host}]:{port}"),
            Self::Inet { host, port } => write!(f, "inet:{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// An IP network: a single address (`192.0.2.7`, `2001:db8::1`) or a CIDR block
/// (`198.51.100.0/24`, `2001:db8::/32`). Host bits below the prefix are
/// rejected, because `10.1.2.3/8` is almost always a typo for something else.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 client (::ffff:192.0.2.1) matches IPv4 entries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(ip, self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(ip, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> u32 {
    let bits = u32::from(ip);
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> u128 {
    let bits = u128::from(ip);
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid network `{s}`: expected an IP address or a CIDR block such as 198.51.100.0/24"
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(format!(
                "invalid network `{s}`: the prefix length is larger than {max}"
            ));
        }
        let masked_ok = match addr {
            IpAddr::V4(v4) => mask_v4(v4, prefix) == u32::from(v4),
            IpAddr::V6(v6) => mask_v6(v6, prefix) == u128::from(v6),
        };
        if !masked_ok {
            return Err(format!(
                "invalid network `{s}`: address bits are set beyond the /{prefix} prefix"
            ));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// Serde glue for the types above: read from a string, written back as the
/// canonical string (so `check-config` prints what it understood).
macro_rules! string_serde {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}

string_serde!(Duration, Size, ListenAddr, IpNet);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "30s".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(30))
        );
        assert_eq!(
            "5m".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(300))
        );
        assert_eq!(
            "30d".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(30 * 86400))
        );
        assert_eq!(
            "250ms".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_millis(250))
        );
        for bad in [
            "",
            "5",
            "m",
            "5 m",
            "-5s",
            "5y",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad}");
        }
        assert_eq!(Duration::from_secs(300).to_string(), "5m");
        assert_eq!(Duration::from_secs(90).to_string(), "90s");
        assert_eq!(
            Duration(StdDuration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!("50MB".parse::<Size>(), Ok(Size(52_428_800)));
        assert_eq!("512".parse::<Size>(), Ok(Size(512)));
        assert_eq!("64KB".parse::<Size>(), Ok(Size(65_536)));
        assert!("5 lb".parse::<Size>().is_err());
        assert!("MB".parse::<Size>().is_err());
        assert_eq!(Size(52_428_800).to_string(), "50MB");
    }

    #[test]
    fn listen_addrs() {
        assert_eq!(
            "inet:127.0.0.1:10040".parse::<ListenAddr>(),
            Ok(ListenAddr::Inet {
                host: "127.0.0.1".into(),
                port: 10040
            })
        );
        assert_eq!(
            "127.0.0.1:9190".parse::<ListenAddr>(),
            Ok(ListenAddr::Inet {
                host: "127.0.0.1".into(),
                port: 9190
            })
        );
        assert_eq!(
            "inet:[::1]:25".parse::<ListenAddr>(),
            Ok(ListenAddr::Inet {
                host: "::1".into(),
                port: 25
            })
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/x.sock".into()))
        );
        for bad in [
            "unix:relative",
            "inet:host",
            "inet::25",
            "inet:::1:25",
            "inet:h:99999",
            "inet:[nothex]:25",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "inet:[::1]:25".parse::<ListenAddr>().map(|a| a.to_string()),
            Ok("inet:[::1]:25".into())
        );
    }

    #[test]
    fn networks() -> Result<(), Box<dyn std::error::Error>> {
        let net: IpNet = "198.51.100.0/24".parse()?;
        assert!(net.contains("198.51.100.200".parse()?));
        assert!(!net.contains("198.51.101.1".parse()?));
        assert!(net.contains("::ffff:198.51.100.9".parse()?));
        let host: IpNet = "2001:db8::1".parse()?;
        assert!(host.contains("2001:db8::1".parse()?));
        assert!(!host.contains("2001:db8::2".parse()?));
        let all: IpNet = "0.0.0.0/0".parse()?;
        assert!(all.contains("203.0.113.1".parse()?));
        assert!("10.1.2.3/8".parse::<IpNet>().is_err());
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("example.org".parse::<IpNet>().is_err());
        Ok(())
    }
}
