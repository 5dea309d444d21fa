//! Store keys: a namespace (`greylist`, `rate`, …) and parts, either kept
//! readable or replaced by a keyed hash.

use ring::hmac;
use std::fmt::{self, Write as _};

/// Bytes of HMAC-SHA256 kept: 128 bits make a collision between two of even
/// billions of keys vanishingly unlikely, in 32 hex characters.
const HASH_BYTES: usize = 16;

/// A key for the [`Store`](super::Store).
///
/// ```
/// use mxguard::store::Key;
/// // Readable: no correspondence data in it.
/// let k = Key::plain("rate", &["192.0.2.7"]);
/// // Anything holding an address or a domain is hashed.
/// let k = Key::hashed("greylist", &["192.0.2.0/24", "alice@example.org", "bob@example.net"]);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    namespace: &'static str,
    parts: Box<[Box<str>]>,
    hashed: bool,
}

impl Key {
    /// `namespace:part:part…`, readable in the store. `:` and `%` in a part
    /// are percent-escaped, so `["a:b"]` and `["a", "b"]` stay distinct.
    /// Only for parts that are not correspondence data (IP addresses,
    /// counters' names); addresses and domains go into [`Key::hashed`].
    pub fn plain(namespace: &'static str, parts: &[&str]) -> Self {
        Self::new(namespace, parts, false)
    }

    /// `namespace:` and 32 hex digits of HMAC-SHA256 over the namespace and
    /// the parts, keyed with the store's secret. The parts are hashed as
    /// given: normalise them first (lowercase domains, …) so that equal
    /// addresses give equal keys.
    pub fn hashed(namespace: &'static str, parts: &[&str]) -> Self {
        Self::new(namespace, parts, true)
    }

    fn new(namespace: &'static str, parts: &[&str], hashed: bool) -> Self {
        debug_assert!(
            !namespace.is_empty()
                && namespace
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "a key namespace is lowercase letters, digits and _: {namespace:?}"
        );
        debug_assert!(namespace != "meta", "the meta namespace is the store's own");
        Self {
            namespace,
            parts: parts.iter().map(|p| Box::from(*p)).collect(),
            hashed,
        }
    }

    pub fn namespace(&self) -> &'static str {
        self.namespace
    }

    pub fn is_hashed(&self) -> bool {
        self.hashed
    }

    /// The key as stored; `secret` is needed for (and only used by) hashed keys.
    pub(super) fn render(&self, secret: Option<&hmac::Key>) -> String {
        let mut out = String::with_capacity(self.namespace.len() + 1 + 2 * HASH_BYTES);
        out.push_str(self.namespace);
        match (self.hashed, secret) {
            (true, Some(secret)) => {
                let mut ctx = hmac::Context::with_key(secret);
                // Length-prefixed fields: no two different part lists hash
                // alike, and the namespace keeps the same address unlinkable
                // across namespaces.
                for field in std::iter::once(self.namespace).chain(self.parts.iter().map(|p| &**p))
                {
                    ctx.update(&(field.len() as u64).to_be_bytes());
                    ctx.update(field.as_bytes());
                }
                let tag = ctx.sign();
                out.push(':');
                out.push_str(&hex(&tag.as_ref()[..HASH_BYTES]));
            }
            (true, None) => {
                // Unreachable through Store, which always passes the secret;
                // never fall back to the clear parts.
                out.push_str(":unhashed");
            }
            (false, _) => {
                for p in &self.parts {
                    out.push(':');
                    escape_into(&mut out, p);
                }
            }
        }
        out
    }
}

/// Hashed parts are not shown, so a key can be logged.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hashed {
            write!(f, "{}:<{} hashed parts>", self.namespace, self.parts.len())
        } else {
            f.write_str(&self.render(None))
        }
    }
}

fn escape_into(out: &mut String, part: &str) {
    for c in part.chars() {
        if c == ':' || c == '%' || c.is_control() || c.is_whitespace() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &[u8]) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, s)
    }

    #[test]
    fn plain_keys_escape_separators() {
        assert_eq!(
            Key::plain("rate", &["192.0.2.7"]).render(None),
            "rate:192.0.2.7"
        );
        assert_eq!(
            Key::plain("rate", &["2001:db8::1", "50%"]).render(None),
            "rate:2001%3Adb8%3A%3A1:50%25"
        );
        assert_ne!(
            Key::plain("x", &["a:b"]).render(None),
            Key::plain("x", &["a", "b"]).render(None)
        );
        assert_eq!(Key::plain("x", &["a b\n"]).render(None), "x:a%20b%0A");
    }

    #[test]
    fn hashed_keys_hide_the_parts() {
        let s = secret(b"0123456789abcdef");
        let k = Key::hashed("greylist", &["192.0.2.7", "alice@example.org"]).render(Some(&s));
        assert!(k.starts_with("greylist:"), "{k}");
        assert_eq!(k.len(), "greylist:".len() + 32);
        assert!(!k.contains("alice") && !k.contains("example"), "{k}");
        // Deterministic for one secret, different for another.
        assert_eq!(
            k,
            Key::hashed("greylist", &["192.0.2.7", "alice@example.org"]).render(Some(&s))
        );
        assert_ne!(
            k,
            Key::hashed("greylist", &["192.0.2.7", "alice@example.org"])
                .render(Some(&secret(b"another secret!!")))
        );
        // Part boundaries and the namespace count.
        assert_ne!(
            Key::hashed("g", &["ab", "c"]).render(Some(&s)),
            Key::hashed("g", &["a", "bc"]).render(Some(&s))
        );
        assert_ne!(
            Key::hashed("g", &["a"]).render(Some(&s))[2..],
            Key::hashed("h", &["a"]).render(Some(&s))[2..]
        );
    }

    #[test]
    fn debug_does_not_show_hashed_parts() {
        let k = Key::hashed("greylist", &["alice@example.org"]);
        assert_eq!(format!("{k:?}"), "greylist:<1 hashed parts>");
        assert_eq!(format!("{:?}", Key::plain("rate", &["x"])), "rate:x");
        assert_eq!(Key::hashed("g", &["a"]).render(None), "g:unhashed");
    }
}
