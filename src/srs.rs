//! The Sender Rewriting Scheme in postsrsd's format (libsrs2): the same
//! secret and SRS domain give the same addresses as Debian's postsrsd, and
//! each reverses the other's.
//!
//! `SRS0=HHHH=TT=domain=local@srs-domain`: HHHH the first characters of
//! base64(HMAC-SHA1(secret, lc(TT) lc(domain) lc(local))), TT the day
//! (UTC, mod 1024) in base32. A sender that is already an SRS0 address of
//! another forwarder becomes `SRS1=HHHH=hop==opaque@srs-domain`.

use crate::envelope::MAX_ADDRESS;
use ring::hmac;
use std::fmt;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Days in the timestamp's cycle (two base32 characters).
const CYCLE: u64 = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SrsError {
    /// Not an SRS address at all.
    NotSrs,
    Malformed(&'static str),
    BadHash,
    Expired,
}

impl fmt::Display for SrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SrsError::NotSrs => f.write_str("not an SRS address"),
            SrsError::Malformed(what) => write!(f, "malformed SRS address ({what})"),
            SrsError::BadHash => f.write_str("the SRS signature does not match"),
            SrsError::Expired => f.write_str("the SRS address has expired"),
        }
    }
}

impl std::error::Error for SrsError {}

#[derive(Clone)]
pub struct Srs {
    /// The first signs; all verify.
    secrets: Vec<Vec<u8>>,
    pub domain: String,
    hash_length: usize,
    max_age_days: u64,
    separator: char,
}

impl fmt::Debug for Srs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Srs")
            .field("secrets", &self.secrets.len())
            .field("domain", &self.domain)
            .finish()
    }
}

/// The secrets of a secrets file: one per line, blank lines skipped.
pub fn parse_secrets(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

impl Srs {
    pub fn new(
        secrets: Vec<Vec<u8>>,
        domain: &str,
        hash_length: usize,
        max_age_days: u64,
        separator: char,
    ) -> Result<Self, String> {
        if secrets.is_empty() {
            return Err("no SRS secret".into());
        }
        if !['=', '-', '+'].contains(&separator) {
            return Err(format!("SRS separator `{separator}` must be one of = - +"));
        }
        Ok(Self {
            secrets,
            domain: domain.trim_end_matches('.').to_lowercase(),
            hash_length: hash_length.clamp(4, 27),
            max_age_days,
            separator,
        })
    }

    /// Whether `domain` is the SRS domain.
    pub fn is_srs_domain(&self, domain: &str) -> bool {
        domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(&self.domain)
    }

    /// The whole base64 HMAC-SHA1 of the lowercased parts.
    fn full_hash(secret: &[u8], parts: &[&str]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
        let mut ctx = hmac::Context::with_key(&key);
        for p in parts {
            ctx.update(p.to_lowercase().as_bytes());
        }
        base64(ctx.sign().as_ref())
    }

    fn hash_with(&self, secret: &[u8], parts: &[&str]) -> String {
        let mut out = Self::full_hash(secret, parts);
        out.truncate(self.hash_length);
        out
    }

    /// Whether `given` is the hash of `parts` under any secret: at least 4
    /// characters, compared in constant time, case-insensitively, with `+`
    /// and `-`, `/` and `_` alike, as postsrsd does.
    fn hash_ok(&self, given: &str, parts: &[&str]) -> bool {
        let given = normalize(given);
        let mut ok = false;
        for secret in &self.secrets {
            let full = normalize(&Self::full_hash(secret, parts));
            if given.len() >= 4 && given.len() <= full.len() {
                ok |= constant_time_eq(&given, &full[..given.len()]);
            }
        }
        ok
    }

    /// The SRS address of `sender` on `day` (days since the epoch).
    pub fn forward_at(&self, sender: &str, day: u64) -> Result<String, SrsError> {
        let (local, host) = sender
            .rsplit_once('@')
            .filter(|(l, h)| !l.is_empty() && !h.is_empty())
            .ok_or(SrsError::Malformed("no domain"))?;
        // The fields of an SRS address are separated by `=`: a domain with
        // one could not be taken apart again (found by fuzzing).
        if host.contains(['=', '@']) || host.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(SrsError::Malformed(
                "a domain that cannot be carried in SRS",
            ));
        }
        // The SRS address goes into the envelope as the new sender: a line
        // break or NUL there is an injection, and no sender longer than an
        // SMTP path allows (RFC 5321: 254 characters) is made longer still.
        if local.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(SrsError::Malformed(
                "a local part that cannot be carried in SRS",
            ));
        }
        if sender.len() > MAX_ADDRESS {
            return Err(SrsError::Malformed("longer than 254 characters"));
        }
        let signer = &self.secrets[0];
        let sep = self.separator;
        if strip_tag(local, "SRS0").is_some() {
            // Another forwarder's SRS0: kept whole (with its separator) as
            // the opaque part.
            let opaque = &local[4..];
            let hash = self.hash_with(signer, &[host, opaque]);
            return Ok(format!("SRS1{sep}{hash}={host}={opaque}@{}", self.domain));
        }
        // SRS1=hash=hop==opaque: keep hop and opaque, sign anew. A local
        // part that only looks like SRS1 (fuzzing found `SRS1=a=b=c`, which
        // could not be reversed) is an ordinary sender, wrapped in SRS0.
        let srs1 = strip_tag(local, "SRS1")
            .and_then(|rest| rest.split_once('='))
            .and_then(|(_, hop_opaque)| hop_opaque.split_once('='))
            .filter(|(hop, opaque)| !hop.is_empty() && opaque.starts_with(['=', '-', '+']));
        if let Some((hop, opaque)) = srs1 {
            let hash = self.hash_with(signer, &[hop, opaque]);
            return Ok(format!("SRS1{sep}{hash}={hop}={opaque}@{}", self.domain));
        }
        let stamp = timestamp(day);
        let hash = self.hash_with(signer, &[&stamp, host, local]);
        Ok(format!(
            "SRS0{sep}{hash}={stamp}={host}={local}@{}",
            self.domain
        ))
    }

    /// The original address behind an SRS address (of any domain: the
    /// signature is what counts), checked against the secrets and the age.
    pub fn reverse_at(&self, address: &str, day: u64) -> Result<String, SrsError> {
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        if let Some(rest) = strip_tag(local, "SRS0") {
            let mut fields = rest.splitn(4, '=');
            let (Some(hash), Some(stamp), Some(host), Some(user)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(SrsError::Malformed(
                    "SRS0 needs hash, time, domain and user",
                ));
            };
            if host.is_empty() || user.is_empty() {
                return Err(SrsError::Malformed("empty domain or user"));
            }
            if !self.hash_ok(hash, &[stamp, host, user]) {
                return Err(SrsError::BadHash);
            }
            self.check_stamp(stamp, day)?;
            return Ok(format!("{user}@{host}"));
        }
        if let Some(rest) = strip_tag(local, "SRS1") {
            let mut fields = rest.splitn(3, '=');
            let (Some(hash), Some(hop), Some(opaque)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(SrsError::Malformed("SRS1 needs hash, hop and address"));
            };
            if hop.is_empty() || opaque.is_empty() {
                return Err(SrsError::Malformed("empty hop or address"));
            }
            // The SRS0 part keeps its own separator: `==`, `=-` or `=+`.
            if !opaque.starts_with(['=', '-', '+']) {
                return Err(SrsError::Malformed("SRS1 without `==`"));
            }
            if !self.hash_ok(hash, &[hop, opaque]) {
                return Err(SrsError::BadHash);
            }
            return Ok(format!("SRS0{opaque}@{hop}"));
        }
        Err(SrsError::NotSrs)
    }

    fn check_stamp(&self, stamp: &str, day: u64) -> Result<(), SrsError> {
        let b = stamp.as_bytes();
        if b.len() != 2 {
            return Err(SrsError::Malformed("timestamp"));
        }
        let value = |c: u8| {
            BASE32
                .iter()
                .position(|&x| x == c.to_ascii_uppercase())
                .map(|p| p as u64)
        };
        let (Some(hi), Some(lo)) = (value(b[0]), value(b[1])) else {
            return Err(SrsError::Malformed("timestamp"));
        };
        let then = hi << 5 | lo;
        let mut now = day % CYCLE;
        while now < then {
            now += CYCLE;
        }
        if now > then + self.max_age_days {
            return Err(SrsError::Expired);
        }
        Ok(())
    }
}

/// `SRS0=`, `srs0-`, `SRS0+`… : the rest after the tag and separator.
fn strip_tag<'a>(local: &'a str, tag: &str) -> Option<&'a str> {
    let head = local.get(..4)?;
    if !head.eq_ignore_ascii_case(tag) {
        return None;
    }
    let rest = &local[4..];
    let first = rest.chars().next()?;
    ['=', '-', '+'].contains(&first).then(|| &rest[1..])
}

/// The day stamp: `day mod 1024` as two base32 characters.
pub fn timestamp(day: u64) -> String {
    let d = day % CYCLE;
    let hi = BASE32[((d >> 5) & 31) as usize] as char;
    let lo = BASE32[(d & 31) as usize] as char;
    format!("{hi}{lo}")
}

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Upper case, with base64url's `-` and `_` read as `+` and `/`.
fn normalize(s: &str) -> Vec<u8> {
    s.bytes()
        .map(|b| match b {
            b'-' => b'+',
            b'_' => b'/',
            other => other.to_ascii_uppercase(),
        })
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 1_700_000_000 / 86_400;

    fn srs() -> Srs {
        Srs::new(vec![b"test-secret".to_vec()], "srs.example.org", 4, 21, '=').unwrap()
    }

    #[test]
    fn the_reference_vectors() {
        let s = srs();
        assert_eq!(timestamp(DAY), "G3");
        assert_eq!(
            s.forward_at("John.Doe@example.com", DAY).unwrap(),
            "SRS0=PF9+=G3=example.com=John.Doe@srs.example.org"
        );
        assert_eq!(
            s.reverse_at("srs0=pf9-=g3=example.com=john.doe@anything", DAY)
                .unwrap(),
            "john.doe@example.com"
        );
        assert_eq!(
            s.forward_at("SRS0=abcd=RN=orig.example=alice@hop1.example", DAY)
                .unwrap(),
            "SRS1=Ciz1=hop1.example==abcd=RN=orig.example=alice@srs.example.org"
        );
        assert_eq!(
            s.reverse_at(
                "SRS1=Ciz1=hop1.example==abcd=RN=orig.example=alice@srs.example.org",
                DAY
            )
            .unwrap(),
            "SRS0=abcd=RN=orig.example=alice@hop1.example"
        );
    }

    /// Fuzzing found a sender whose domain held `=`: its SRS address did
    /// not reverse. Such senders are not rewritten.
    #[test]
    fn odd_senders_are_refused_or_wrapped_so_that_they_reverse() {
        let s = srs();
        let long = format!("{}@example.com", "a".repeat(243));
        assert!(s.forward_at(&long[1..], DAY).is_ok(), "254 characters");
        for sender in [
            "\u{fffd}J@\u{fffd}J=MM",
            "a@b=c",
            "a@b c",
            "a@b\r\nx",
            "a\r\nBcc: x@evil.example@b.example",
            "a\0b@b.example",
            "a b@b.example",
            long.as_str(),
        ] {
            assert!(
                matches!(s.forward_at(sender, DAY), Err(SrsError::Malformed(_))),
                "{sender:?}"
            );
        }
        // Local parts that only look like SRS1 are wrapped like any other;
        // another forwarder's SRS0 with `-` keeps it.
        for sender in [
            "sRS1=qS1=qR=x@y.example",
            "SRS1=a@b.example",
            "SRS1=h=@b.example",
        ] {
            let f = s.forward_at(sender, DAY).unwrap();
            assert!(f.starts_with("SRS0="), "{f}");
            assert_eq!(s.reverse_at(&f, DAY).unwrap(), sender);
        }
        let f = s
            .forward_at("SRS0-abcd=RN=orig.example=alice@hop.example", DAY)
            .unwrap();
        assert!(f.contains("=hop.example=-abcd="), "{f}");
        assert_eq!(
            s.reverse_at(&f, DAY).unwrap(),
            "SRS0-abcd=RN=orig.example=alice@hop.example"
        );
        // International domains are carried as they are.
        let f = s.forward_at("a@bücher.example", DAY).unwrap();
        assert_eq!(s.reverse_at(&f, DAY).unwrap(), "a@bücher.example");
    }

    #[test]
    fn round_trips_case_and_separators() {
        let s = srs();
        for sender in [
            "a@b.example",
            "First.Last+tag@Example.COM",
            "x=y@d.example",
            "ü@exämple.org",
        ] {
            let f = s.forward_at(sender, DAY).unwrap();
            assert_eq!(s.reverse_at(&f, DAY).unwrap(), sender);
            assert_eq!(
                s.reverse_at(&f.to_lowercase(), DAY).unwrap().to_lowercase(),
                sender.to_lowercase()
            );
            assert_eq!(
                s.reverse_at(&f.to_uppercase(), DAY).unwrap().to_lowercase(),
                sender.to_lowercase()
            );
        }
        let dash = Srs::new(vec![b"k".to_vec()], "srs.example.org", 4, 21, '-').unwrap();
        let f = dash.forward_at("a@b.example", DAY).unwrap();
        assert!(f.starts_with("SRS0-"), "{f}");
        assert_eq!(
            s.reverse_at(&f, DAY),
            Err(SrsError::BadHash),
            "another secret"
        );
        assert_eq!(dash.reverse_at(&f, DAY).unwrap(), "a@b.example");
    }

    #[test]
    fn srs1_chains_reverse_hop_by_hop() {
        let hop1 = Srs::new(vec![b"one".to_vec()], "hop1.example", 4, 21, '=').unwrap();
        let hop2 = srs();
        let first = hop1.forward_at("alice@orig.example", DAY).unwrap();
        let second = hop2.forward_at(&first, DAY).unwrap();
        assert!(second.starts_with("SRS1="), "{second}");
        let back = hop2.reverse_at(&second, DAY).unwrap();
        assert_eq!(back, first);
        assert_eq!(hop1.reverse_at(&back, DAY).unwrap(), "alice@orig.example");
    }

    #[test]
    fn rotation_signs_with_the_first_and_verifies_with_all() {
        let old = Srs::new(vec![b"old".to_vec()], "srs.example.org", 4, 21, '=').unwrap();
        let rotated = Srs::new(
            vec![b"new".to_vec(), b"old".to_vec()],
            "srs.example.org",
            4,
            21,
            '=',
        )
        .unwrap();
        let issued = old.forward_at("a@b.example", DAY).unwrap();
        assert_eq!(rotated.reverse_at(&issued, DAY).unwrap(), "a@b.example");
        let fresh = rotated.forward_at("a@b.example", DAY).unwrap();
        assert_ne!(fresh, issued);
        assert_eq!(old.reverse_at(&fresh, DAY), Err(SrsError::BadHash));
        assert_eq!(
            parse_secrets("new\r\n\nold\n"),
            [b"new".to_vec(), b"old".to_vec()]
        );
    }

    #[test]
    fn expiry_after_21_days_and_across_the_cycle() {
        let s = srs();
        let f = s.forward_at("a@b.example", DAY).unwrap();
        assert!(s.reverse_at(&f, DAY + 21).is_ok());
        assert_eq!(s.reverse_at(&f, DAY + 22), Err(SrsError::Expired));
        // A stamp from just before the day count wraps at 1024.
        let day = DAY - DAY % 1024 + 1023;
        let f = s.forward_at("a@b.example", day).unwrap();
        assert!(s.reverse_at(&f, day + 5).is_ok());
        assert_eq!(s.reverse_at(&f, day + 30), Err(SrsError::Expired));
    }

    #[test]
    fn malformed_addresses_are_named() {
        let s = srs();
        for bad in [
            "SRS0=abcd=G3=example.com@srs.example.org",
            "SRS0=abcd@srs.example.org",
            "SRS0=abcd=G3==u@srs.example.org",
            "SRS1=abcd@srs.example.org",
            "SRS0=ab=G3=example.com=u@srs.example.org",
            "SRS0=abcd=G!=example.com=u@srs.example.org",
        ] {
            assert!(
                matches!(
                    s.reverse_at(bad, DAY),
                    Err(SrsError::Malformed(_) | SrsError::BadHash)
                ),
                "{bad}"
            );
        }
        assert_eq!(
            s.reverse_at("alice@srs.example.org", DAY),
            Err(SrsError::NotSrs)
        );
        assert_eq!(
            s.reverse_at("SRS2=x=y@srs.example.org", DAY),
            Err(SrsError::NotSrs)
        );
        assert!(s.forward_at("no-domain", DAY).is_err());
        assert!(Srs::new(vec![], "d.example", 4, 21, '=').is_err());
    }
}
