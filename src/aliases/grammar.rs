//! The rule grammar of `forward-email=` TXT records, which the `rules:` of a
//! domain in mxguard.yaml share: catch-all targets, `alias:target`, regex
//! aliases, disabled aliases, webhooks, and `forward-email-port=`.
//!
//! Parsing never fails as a whole: a bad element is reported (record text
//! and position) and left out, and the other elements keep working.

use regex::{Regex, RegexBuilder};
use std::{fmt, net::IpAddr};

/// The prefix of a TXT record that carries rules (case-sensitive).
pub const PREFIX: &str = "forward-email=";
/// The prefix of a TXT record that carries a custom SMTP port.
pub const PORT_PREFIX: &str = "forward-email-port=";
/// The prefix of the reference's plan verification records: recognised, not
/// a rule.
pub const VERIFICATION_PREFIX: &str = "forward-email-site-verification=";

/// What one record set may cost. A record set over a limit keeps the
/// elements before it and reports the rest.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Elements kept from one record set.
    pub max_rules: usize,
    /// Regex elements kept from one record set (each costs a compile and a
    /// match per lookup).
    pub max_regexes: usize,
    /// Longest regex pattern, in bytes.
    pub max_pattern_len: usize,
    /// Compiled size limit of one regex, in bytes (the `regex` crate's
    /// `size_limit`), so a short pattern cannot expand into a huge automaton.
    pub regex_size_limit: usize,
    /// Longest element (alias and target), in bytes.
    pub max_element_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_rules: 1000,
            max_regexes: 50,
            max_pattern_len: 1000,
            regex_size_limit: 256 * 1024,
            max_element_len: 2000,
        }
    }
}

impl Limits {
    /// The limits for `rules` elements the operator wrote (mxguard.yaml, a
    /// roster): trusted data, so every element is kept; the per-element
    /// and regex limits still hold.
    pub fn operator(rules: usize) -> Self {
        let default = Self::default();
        Self {
            max_rules: rules.max(default.max_rules),
            ..default
        }
    }
}

/// How a disabled alias answers: `!` accept and drop, `!!` try again
/// later, `!!!` reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disabled {
    Discard,
    Tempfail,
    Reject,
}

impl Disabled {
    /// Splits `!`, `!!` or `!!!` off the front of `s`.
    fn strip(s: &str) -> (Option<Disabled>, &str) {
        if let Some(rest) = s.strip_prefix("!!!") {
            (Some(Disabled::Reject), rest)
        } else if let Some(rest) = s.strip_prefix("!!") {
            (Some(Disabled::Tempfail), rest)
        } else if let Some(rest) = s.strip_prefix('!') {
            (Some(Disabled::Discard), rest)
        } else {
            (None, s)
        }
    }

    pub fn marks(self) -> &'static str {
        match self {
            Disabled::Discard => "!",
            Disabled::Tempfail => "!!",
            Disabled::Reject => "!!!",
        }
    }
}

/// Where mail goes: an address, a whole domain (the alias's user name at
/// that domain), an IP address (`user@[ip]`), or a webhook URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Address(String),
    Domain(String),
    Ip(IpAddr),
    Url(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(a) | Target::Domain(a) | Target::Url(a) => f.write_str(a),
            Target::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// What a target written after `alias:` is.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    Fixed(Target),
    /// A regex target with `$1`… to fill in from the match.
    Template(String),
    /// Not an address, domain, IP or URL: the alias answers with an error
    /// naming the element, and nothing else is affected.
    Invalid,
}

#[derive(Clone, Debug)]
pub enum Matcher {
    /// `alias:` — the user name, lowercased.
    Name(String),
    Regex(Box<RegexRule>),
    /// A bare target: every address of the domain that no alias matched.
    CatchAll,
}

#[derive(Clone, Debug)]
pub struct RegexRule {
    pub regex: Regex,
    /// `g`: substitute every match, not only the first.
    pub global: bool,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub matcher: Matcher,
    pub disabled: Option<Disabled>,
    /// `None` for a disabled alias without a target.
    pub target: Option<TargetSpec>,
    /// The element as written, for logs and replies.
    pub element: String,
}

/// A problem with one element or record, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub record: String,
    /// Byte offset of the element in the record.
    pub position: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} at position {}: {}",
            self.record, self.position, self.message
        )
    }
}

/// The parsed rules of one domain.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub errors: Vec<ParseError>,
    /// From `forward-email-port=` (or the domain's `port:`); `None` is 25.
    pub port: Option<u16>,
    /// `forward-email-site-verification=` records seen (not rules).
    pub verifications: usize,
    /// At least one `forward-email=` record, or `rules:` in the YAML.
    pub has_records: bool,
    /// Some record has text, yet no element came out of it
    /// (`forward-email=,`).
    pub zero_elements: bool,
}

impl RuleSet {
    /// The rules from a domain's TXT records, each already joined from its
    /// character-strings.
    pub fn from_txt<S: AsRef<str>>(records: &[S], limits: &Limits) -> RuleSet {
        let mut set = RuleSet::default();
        let mut seen = Seen::default();
        let mut texts = 0;
        let mut port_seen = false;
        for record in records {
            let record = record.as_ref().trim();
            if let Some(value) = record.strip_prefix(PREFIX) {
                set.has_records = true;
                if !value.trim().is_empty() {
                    texts += 1;
                }
                set.add_value(&mut seen, record, PREFIX.len(), value, limits);
            } else if let Some(value) = record.strip_prefix(PORT_PREFIX) {
                // The first record counts; an invalid port means 25.
                if !port_seen {
                    port_seen = true;
                    set.port = parse_port(value.trim());
                    if set.port.is_none() && value.trim() != "25" {
                        set.error(record, PORT_PREFIX.len(), "not a port number; 25 is used");
                    }
                }
            } else if record.starts_with(VERIFICATION_PREFIX) {
                set.verifications += 1;
            }
        }
        set.zero_elements = texts > 0 && set.rules.is_empty() && set.errors.is_empty();
        set
    }

    /// The rules of a domain in mxguard.yaml: each string is what would
    /// follow `forward-email=` in a record.
    pub fn from_rules<S: AsRef<str>>(rules: &[S], port: Option<u16>, limits: &Limits) -> RuleSet {
        let mut set = RuleSet {
            has_records: true,
            port: port.filter(|p| *p != 25),
            ..RuleSet::default()
        };
        let mut seen = Seen::default();
        for rule in rules {
            let rule = rule.as_ref();
            set.add_value(&mut seen, rule, 0, rule, limits);
        }
        set
    }

    fn error(&mut self, record: &str, position: usize, message: impl Into<String>) {
        // A hostile record could make thousands; the first ones tell the story.
        if self.errors.len() < 100 {
            self.errors.push(ParseError {
                record: record.to_owned(),
                position,
                message: message.into(),
            });
        }
    }

    /// Parses the value of one record (`offset`: where `value` starts in
    /// `record`).
    fn add_value<'a>(
        &mut self,
        seen: &mut Seen<'a>,
        record: &str,
        offset: usize,
        value: &'a str,
        limits: &Limits,
    ) {
        for (start, element) in split_elements(value) {
            let position = offset + start;
            if element.is_empty() {
                continue;
            }
            if self.rules.len() >= limits.max_rules {
                self.error(
                    record,
                    position,
                    format!(
                        "more than {} rules; this and the following ones are ignored",
                        limits.max_rules
                    ),
                );
                return;
            }
            if element.len() > limits.max_element_len {
                self.error(
                    record,
                    position,
                    format!("element longer than {} bytes", limits.max_element_len),
                );
                continue;
            }
            // Exact duplicates add nothing.
            if !seen.elements.insert(element) {
                continue;
            }
            match parse_element(element, seen.regexes, limits) {
                Ok(Some(rule)) => {
                    if matches!(rule.target, Some(TargetSpec::Invalid)) {
                        self.error(record, position, invalid_target_message(element));
                    }
                    if matches!(rule.matcher, Matcher::Regex(_)) {
                        seen.regexes += 1;
                    }
                    self.rules.push(rule);
                }
                Ok(None) => self.error(
                    record,
                    position,
                    format!("{element:?} is neither `alias:target` nor a target; ignored"),
                ),
                Err(message) => self.error(record, position, message),
            }
        }
    }
}

/// What the parse of one record set has met so far: set lookups, so that
/// 10 000 elements parse in linear time (the scans they replace made it
/// 169 ms).
#[derive(Default)]
struct Seen<'a> {
    elements: std::collections::HashSet<&'a str>,
    regexes: usize,
}

fn invalid_target_message(element: &str) -> String {
    format!(
        "invalid target in {element:?}: not an e-mail address, domain, IP address or http(s) URL"
    )
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0 && *p != 25)
}

/// Splits a record value into trimmed elements with their byte offsets.
/// Commas separate elements, except inside a regex (`/a{1,3}/:x`), which
/// ends at the `/:` (or `/g:`, `/i:`, `/gi:`, `/ig:`) before the next
/// element that starts a regex.
fn split_elements(value: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < value.len() {
        let rest = &value[pos..];
        let lead = rest.len() - rest.trim_start_matches([' ', '\t', ',']).len();
        pos += lead;
        let rest = &value[pos..];
        if rest.is_empty() {
            break;
        }
        let (_, body) = Disabled::strip(rest);
        let end = if body.starts_with('/') {
            let marks = rest.len() - body.len();
            regex_element_end(rest, marks)
        } else {
            rest.find(',').unwrap_or(rest.len())
        };
        let element = &rest[..end];
        let trimmed = element.trim_end();
        out.push((pos, trimmed));
        pos += end;
    }
    out
}

/// The length of a regex element at the start of `s` (after `marks`
/// exclamation marks): up to the first comma after the regex's closing
/// `/flags:`, choosing the last closing before the next `,/` (or `,!/`) so
/// that commas inside the pattern are kept.
fn regex_element_end(s: &str, marks: usize) -> usize {
    let bytes = s.as_bytes();
    let next_regex = (marks + 1..bytes.len())
        .find(|&i| {
            bytes[i] == b','
                && s[i + 1..]
                    .trim_start()
                    .trim_start_matches('!')
                    .starts_with('/')
        })
        .unwrap_or(bytes.len());
    let closings: Vec<usize> = (marks + 1..bytes.len())
        .filter(|&i| bytes[i] == b'/' && closing_len(&s[i..]).is_some())
        .collect();
    let closing = closings
        .iter()
        .rev()
        .find(|&&i| i < next_regex)
        .or_else(|| closings.first());
    match closing {
        Some(&i) => {
            let after = i + closing_len(&s[i..]).unwrap_or(2);
            s[after..].find(',').map_or(s.len(), |c| after + c)
        }
        // No closing: the element runs to the next comma (and is reported).
        None => s[marks..].find(',').map_or(s.len(), |c| marks + c),
    }
}

/// `/:`, `/g:`, `/i:`, `/gi:`, `/ig:` at the start of `s`: its length.
fn closing_len(s: &str) -> Option<usize> {
    ["/:", "/g:", "/i:", "/gi:", "/ig:"]
        .iter()
        .find(|c| s.starts_with(**c))
        .map(|c| c.len())
}

/// One element. `Ok(None)`: not a rule (ignored, reported by the caller).
fn parse_element(element: &str, regexes: usize, limits: &Limits) -> Result<Option<Rule>, String> {
    if element.chars().any(char::is_control) {
        return Err(format!(
            "{:?} contains a control character; ignored",
            element
        ));
    }
    let (disabled, body) = Disabled::strip(element);
    let rule = |matcher, target| Rule {
        matcher,
        disabled,
        target,
        element: element.to_owned(),
    };
    if body.starts_with('/') {
        if regexes >= limits.max_regexes {
            return Err(format!(
                "more than {} regex aliases; ignored",
                limits.max_regexes
            ));
        }
        let (regex, target) = parse_regex(body, limits)?;
        let target = match target {
            None | Some("") => None,
            Some(t) if t.contains('$') => Some(TargetSpec::Template(t.to_owned())),
            Some(t) => Some(match Disabled::strip(t) {
                // `/re/:!!` reads as a disabled regex alias.
                (Some(_), "") => TargetSpec::Template(t.to_owned()),
                _ => parse_target(t).map_or(TargetSpec::Invalid, TargetSpec::Fixed),
            }),
        };
        return Ok(Some(rule(Matcher::Regex(Box::new(regex)), target)));
    }
    let is_url = has_url_scheme(body);
    if disabled.is_none() && (is_url || !body.contains(':') || body.parse::<IpAddr>().is_ok()) {
        // A bare target: the catch-all.
        return Ok(parse_target(body).map(|t| rule(Matcher::CatchAll, Some(TargetSpec::Fixed(t)))));
    }
    let (name, target) = match body.split_once(':') {
        Some((name, target)) if !is_url => (name.trim(), Some(target.trim())),
        _ => (body.trim(), None),
    };
    if name.is_empty() || name.contains(['@', ' ', '/']) {
        return Ok(None);
    }
    let target = match target {
        None | Some("") => None,
        Some(t) => Some(parse_target(t).map_or(TargetSpec::Invalid, TargetSpec::Fixed)),
    };
    if disabled.is_none() && target.is_none() {
        return Ok(None);
    }
    Ok(Some(rule(Matcher::Name(name.to_lowercase()), target)))
}

/// `/pattern/flags:target` → the compiled regex and the target text.
fn parse_regex<'a>(body: &'a str, limits: &Limits) -> Result<(RegexRule, Option<&'a str>), String> {
    let inner = &body[1..];
    let closing = ["/gi:", "/ig:", "/g:", "/i:", "/:"]
        .iter()
        .find_map(|c| inner.rfind(c).map(|i| (i, *c)));
    let (pattern, flags, target) = match closing {
        Some((i, c)) => (&inner[..i], &c[1..c.len() - 1], Some(&inner[i + c.len()..])),
        // `!/re/` without a target.
        None => match inner.strip_suffix('/') {
            Some(p) => (p, "", None),
            None => {
                return Err(format!("regex {body:?} has no closing `/:`; ignored"));
            }
        },
    };
    if pattern.len() > limits.max_pattern_len {
        return Err(format!(
            "regex longer than {} bytes; ignored",
            limits.max_pattern_len
        ));
    }
    if pattern.is_empty() {
        return Err("empty regex; ignored".into());
    }
    // Case-insensitive always: user names are compared lowercased, and the
    // operator's intent is never a case-sensitive alias.
    let regex = RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(limits.regex_size_limit)
        .dfa_size_limit(limits.regex_size_limit)
        .nest_limit(50)
        .build()
        .map_err(|e| {
            let first = e.to_string();
            let first = first.lines().last().unwrap_or("invalid").trim().to_owned();
            format!("invalid regex /{pattern}/: {first}; ignored")
        })?;
    Ok((
        RegexRule {
            regex,
            global: flags.contains('g'),
        },
        target.map(str::trim),
    ))
}

fn has_url_scheme(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// A target as written: an e-mail address, a domain, an IP address or an
/// http(s) URL. Addresses, domains and IPs are lowercased; URLs keep their
/// case except for the scheme.
pub fn parse_target(t: &str) -> Option<Target> {
    let t = t.trim();
    if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    if has_url_scheme(t) {
        let (scheme, rest) = t.split_once("://")?;
        let url = format!("{}://{rest}", scheme.to_ascii_lowercase());
        let parsed = reqwest::Url::parse(&url).ok()?;
        parsed.host_str().filter(|h| !h.is_empty())?;
        return Some(Target::Url(url));
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Some(Target::Ip(ip));
    }
    if let Some((local, domain)) = t.rsplit_once('@') {
        if !valid_local_part(local) {
            return None;
        }
        let domain = domain.to_lowercase();
        let ok = match domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            Some(ip) => ip.parse::<IpAddr>().is_ok(),
            None => is_fqdn(&domain),
        };
        return ok.then(|| Target::Address(format!("{}@{domain}", local.to_lowercase())));
    }
    let domain = t.to_lowercase();
    is_fqdn(&domain).then_some(Target::Domain(domain))
}

/// A dot-atom local part (RFC 5321), UTF-8 allowed (SMTPUTF8).
fn valid_local_part(local: &str) -> bool {
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~.".contains(c))
}

/// A fully qualified domain name: at least two labels of letters, digits
/// and hyphens (or non-ASCII), a top-level label that is not all digits.
pub fn is_fqdn(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.len() > 253 || !d.contains('.') {
        return false;
    }
    let labels: Vec<&str> = d.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| !tld.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(v: &str) -> Vec<&str> {
        split_elements(v).into_iter().map(|(_, e)| e).collect()
    }

    #[test]
    fn commas_inside_a_regex_do_not_split() {
        assert_eq!(
            elements("/^a{1,3}$/:x@gmail.com,y@gmail.com"),
            ["/^a{1,3}$/:x@gmail.com", "y@gmail.com"]
        );
        assert_eq!(elements("a:b@c.d,,  e:f@g.h , "), ["a:b@c.d", "e:f@g.h"]);
        assert_eq!(
            elements("!/^spam/:user@gmail.com,user@gmail.com"),
            ["!/^spam/:user@gmail.com", "user@gmail.com"]
        );
        assert_eq!(
            elements("/a{1,2}/:x@y.z,/b{1,2}/g:$1@y.z,c@d.e"),
            ["/a{1,2}/:x@y.z", "/b{1,2}/g:$1@y.z", "c@d.e"]
        );
    }

    #[test]
    fn positions_point_at_the_element() {
        let set = RuleSet::from_txt(
            &["forward-email=a:b@c.de,hello:notanemail"],
            &Limits::default(),
        );
        assert_eq!(set.rules.len(), 2);
        assert_eq!(set.errors.len(), 1);
        assert_eq!(set.errors[0].position, 23);
        assert!(set.errors[0].message.contains("hello:notanemail"));
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("User@Gmail.COM"),
            Some(Target::Address("user@gmail.com".into()))
        );
        assert_eq!(
            parse_target("Example.NET"),
            Some(Target::Domain("example.net".into()))
        );
        assert_eq!(
            parse_target("HTTPS://Hooks.example.org/In?A=B"),
            Some(Target::Url("https://Hooks.example.org/In?A=B".into()))
        );
        assert_eq!(
            parse_target("192.0.2.1"),
            Some(Target::Ip("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(
            parse_target("u@[192.0.2.1]"),
            Some(Target::Address("u@[192.0.2.1]".into()))
        );
        for bad in [
            "notanemail",
            "a@b",
            "a b@c.de",
            "a@c.de\r\nBcc: x@y.z",
            "a\0@c.de",
            "ftp://x.y",
            "@c.de",
            "a@@c.de",
            "1.2.3",
            "a..b@c.de",
            "<a@c.de>",
            "a@-c.de",
        ] {
            assert_eq!(parse_target(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ports() {
        let port =
            |r: &str| RuleSet::from_txt(&[r, "forward-email-port=99"], &Limits::default()).port;
        assert_eq!(port("forward-email-port=2525"), Some(2525));
        assert_eq!(port("forward-email-port=25"), None);
        assert_eq!(port("forward-email-port=abc"), None);
        assert_eq!(port("forward-email-port=70000"), None);
    }
}
