//! Resolution of one address: the matching rules of its domain, disabled
//! aliases, catch-alls, regex substitution, recursion through aliases of
//! handled domains, plus-addressing, de-duplication and the limit of
//! forwarded addresses.

use super::{
    Aliases, Lookup,
    grammar::{Disabled, Matcher, RegexRule, Rule, RuleSet, Target, TargetSpec, parse_target},
    normalize_domain,
};
use crate::verdict::{Reply, Verdict};
use std::{fmt, future::Future, pin::Pin};

/// Deepest chain of aliases followed (`a` → `b` → `c` …).
pub const MAX_DEPTH: usize = 5;
/// Most addresses resolved for one recipient, recursion included, so a
/// record set cannot make one RCPT cost thousands of lookups.
const MAX_LOOKUPS: usize = 50;
/// Longest result of a regex substitution.
const MAX_SUBSTITUTION: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    Address(String),
    Webhook(String),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Address(a) | Destination::Webhook(a) => f.write_str(a),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a domain mxguard forwards for: left to Postfix.
    NotHandled,
    /// Forward to these destinations; `port` other than 25 if set. A
    /// single destination equal to the address itself means "deliver it
    /// as it is, on `port`".
    Forward {
        destinations: Vec<Destination>,
        port: Option<u16>,
    },
    /// `!alias`: accepted and dropped.
    Discard,
    /// Refused for now or for good, with its reply.
    Refuse(Verdict),
}

/// An answer for one address, with the reason for logs and `mxguard
/// resolve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub address: String,
    pub outcome: Outcome,
    pub reason: String,
    /// The forwarding came back to an address on its own path.
    pub looped: bool,
}

impl Resolved {
    fn new(address: &str, outcome: Outcome, reason: impl Into<String>) -> Self {
        Self {
            address: address.to_owned(),
            outcome,
            reason: reason.into(),
            looped: false,
        }
    }

    fn refuse(address: &str, verdict: Verdict, reason: impl Into<String>) -> Self {
        Self::new(address, Outcome::Refuse(verdict), reason)
    }

    /// The envelope verdict at RCPT: forwarding and `!` accept (the milter
    /// rewrites or drops at the end of the message).
    pub fn verdict(&self) -> Verdict {
        match &self.outcome {
            Outcome::Refuse(v) => v.clone(),
            _ => Verdict::Continue,
        }
    }

    /// `forward`, `discard`, `tempfail`, `reject` (or `none` when not
    /// handled), for logs, metrics and `mxguard resolve`.
    pub fn label(&self) -> &'static str {
        match &self.outcome {
            Outcome::NotHandled => "none",
            Outcome::Forward { .. } => "forward",
            Outcome::Discard => "discard",
            Outcome::Refuse(v) => v.label(),
        }
    }
}

/// A destination while it is being worked out.
#[derive(Clone, Debug)]
struct Dest {
    target: Destination,
    /// The incoming `+tag` may be carried onto it (e-mail targets only; not
    /// `alias:domain` or IP targets, whose local part is the user name).
    taggable: bool,
}

type Boxed<'a> = Pin<Box<dyn Future<Output = Resolved> + Send + 'a>>;

impl Aliases {
    /// Where mail for `address` goes.
    pub async fn resolve(&self, address: &str) -> Resolved {
        let mut lookups = 0;
        self.resolve_at(address.to_owned(), Vec::new(), &mut lookups)
            .await
    }

    fn resolve_at<'a>(
        &'a self,
        address: String,
        path: Vec<String>,
        lookups: &'a mut usize,
    ) -> Boxed<'a> {
        Box::pin(async move {
            let Some((local, domain)) = address.rsplit_once('@') else {
                return Resolved::new(
                    &address,
                    Outcome::NotHandled,
                    "not an address with a domain",
                );
            };
            let domain = normalize_domain(domain);
            let rules = match self.rules(&domain).await {
                Lookup::Rules(r) => r,
                Lookup::NotHandled => {
                    return Resolved::new(
                        &address,
                        Outcome::NotHandled,
                        format!("{domain} is not a domain this server forwards for"),
                    );
                }
                Lookup::Failed(e) => {
                    return Resolved::refuse(
                        &address,
                        Verdict::Tempfail(Reply::new(
                            451,
                            "4.4.3",
                            format!(
                                "Cannot look up where mail for {address} goes (DNS trouble); try again later"
                            ),
                        )),
                        e,
                    );
                }
            };
            let (user, tag) = match local.split_once('+') {
                Some((u, t)) => (u.to_lowercase(), Some(t)),
                None => (local.to_lowercase(), None),
            };
            let me = format!("{user}@{domain}");
            let mut path = path;
            path.push(me.clone());
            let dests = match evaluate(&rules, &user, &domain, &address) {
                Ok(d) => d,
                Err(resolved) => return resolved,
            };

            // Recursion: an address of a domain mxguard forwards for is
            // replaced by its own destinations.
            let mut looped = false;
            let mut out: Vec<Dest> = Vec::new();
            for d in dests {
                let Destination::Address(a) = &d.target else {
                    out.push(d);
                    continue;
                };
                let key = plus_stripped(a);
                if path.contains(&key) {
                    looped = true;
                    continue;
                }
                if path.len() > MAX_DEPTH || *lookups >= MAX_LOOKUPS {
                    out.push(d);
                    continue;
                }
                *lookups += 1;
                let inner = self.resolve_at(a.clone(), path.clone(), lookups).await;
                match inner.outcome {
                    Outcome::Forward { destinations, .. } => {
                        out.extend(destinations.into_iter().map(|target| Dest {
                            target,
                            taggable: d.taggable,
                        }));
                    }
                    // A chain that only leads back here delivers nowhere.
                    _ if inner.looped => looped = true,
                    _ => out.push(d),
                }
            }

            let mut destinations = finish(out, tag);
            if destinations.is_empty() {
                if let Some(port) = rules.port {
                    // The address itself, to its own domain on that port.
                    return Resolved::new(
                        &address,
                        Outcome::Forward {
                            destinations: vec![Destination::Address(address.to_lowercase())],
                            port: Some(port),
                        },
                        format!("delivered as addressed, on port {port}"),
                    );
                }
                let mut r = if looped {
                    Resolved::refuse(
                        &address,
                        Verdict::Reject(Reply::new(
                            550,
                            "5.4.6",
                            format!(
                                "Mail for {address} is forwarded back to itself (a forwarding loop)"
                            ),
                        )),
                        "every destination loops back",
                    )
                } else {
                    not_found(&address, "no destination left")
                };
                r.looped = looped;
                return r;
            }
            let max = self.max_forwarded(&domain);
            if destinations.len() > max {
                let n = destinations.len();
                return Resolved::refuse(
                    &address,
                    Verdict::Tempfail(Reply::new(
                        421,
                        "4.4.2",
                        format!(
                            "The address {address} is attempted to be forwarded to ({n}) addresses which exceeds the maximum of ({max})"
                        ),
                    )),
                    format!("{n} destinations, more than {max}"),
                );
            }
            destinations.truncate(max);
            let port = rules.port;
            let shown: Vec<String> = destinations.iter().map(ToString::to_string).collect();
            let mut r = Resolved::new(
                &address,
                Outcome::Forward { destinations, port },
                format!("forwarded to {}", shown.join(", ")),
            );
            r.looped = looped;
            r
        })
    }
}

fn not_found(address: &str, reason: &str) -> Resolved {
    Resolved::refuse(
        address,
        Verdict::Reject(Reply::new(
            550,
            "5.1.1",
            format!("{address} does not exist"),
        )),
        reason,
    )
}

fn disabled(address: &str, how: Disabled, element: &str) -> Resolved {
    let reason = format!("disabled by {element:?}");
    match how {
        Disabled::Discard => Resolved::new(address, Outcome::Discard, reason),
        Disabled::Tempfail => Resolved::refuse(
            address,
            Verdict::Tempfail(Reply::new(
                450,
                "4.2.1",
                "Mailbox is disabled, try again later",
            )),
            reason,
        ),
        Disabled::Reject => Resolved::refuse(
            address,
            Verdict::Reject(Reply::new(550, "5.1.1", "Mailbox is disabled")),
            reason,
        ),
    }
}

/// The matching rules of one record set for `user`: a disabled alias
/// wins; specific and regex aliases accumulate; catch-alls apply only when
/// no alias matched.
fn evaluate(
    rules: &RuleSet,
    user: &str,
    domain: &str,
    address: &str,
) -> Result<Vec<Dest>, Resolved> {
    if rules.zero_elements {
        return Err(Resolved::refuse(
            address,
            Verdict::Tempfail(Reply::new(
                421,
                "4.4.2",
                format!(
                    "{address} domain of {domain} has zero forwarded addresses configured in the TXT record with \"forward-email\""
                ),
            )),
            "a forward-email= record with no element",
        ));
    }
    if rules.rules.is_empty() {
        return Err(not_found(address, "no forwarding rules"));
    }
    let mut matched = false;
    let mut dests = Vec::new();
    let mut invalid: Option<String> = None;
    let mut disabled_by: Option<(Disabled, &Rule)> = None;
    for rule in &rules.rules {
        let found = match &rule.matcher {
            Matcher::Name(n) => (n == user).then(|| rule.target.clone()),
            Matcher::Regex(re) => re.regex.is_match(user).then(|| {
                rule.target.as_ref().map(|t| match t {
                    TargetSpec::Template(tpl) => substituted(re, user, tpl),
                    other => other.clone(),
                })
            }),
            Matcher::CatchAll => None,
        };
        let Some(target) = found else { continue };
        matched = true;
        if let Some(how) = rule.disabled {
            disabled_by.get_or_insert((how, rule));
            continue;
        }
        match target {
            Some(TargetSpec::Fixed(t)) => {
                if let Some(d) = dest(t, user, false) {
                    dests.push(d);
                }
            }
            Some(TargetSpec::Template(result)) => {
                // A substitution that reads `!`, `!!` or `!!!`.
                let how = if result.starts_with("!!!") {
                    Disabled::Reject
                } else if result.starts_with("!!") {
                    Disabled::Tempfail
                } else {
                    Disabled::Discard
                };
                disabled_by.get_or_insert((how, rule));
            }
            Some(TargetSpec::Invalid) | None => {
                invalid.get_or_insert_with(|| rule.element.clone());
            }
        }
    }
    if let Some((how, rule)) = disabled_by {
        return Err(disabled(address, how, &rule.element));
    }
    if !matched {
        for rule in &rules.rules {
            if let (Matcher::CatchAll, Some(TargetSpec::Fixed(t))) = (&rule.matcher, &rule.target)
                && let Some(d) = dest(t.clone(), user, true)
            {
                dests.push(d);
            }
        }
    }
    if dests.is_empty() {
        if let Some(element) = invalid {
            let text = if element.starts_with('/') || element.starts_with("!/") {
                format!(
                    "Domain of {domain} has an invalid \"forward-email\" TXT record due to an invalid regular expression email address match"
                )
            } else {
                format!(
                    "{} domain of {domain} has an invalid \"forward-email\" TXT record due to an invalid email address of \"{element}\"",
                    element.to_lowercase()
                )
            };
            return Err(Resolved::refuse(
                address,
                Verdict::Reject(Reply::new(550, "5.1.1", text)),
                format!("the rule {element:?} has an invalid target"),
            ));
        }
        return Err(not_found(
            address,
            if matched {
                "no destination"
            } else {
                "no alias matches and there is no catch-all"
            },
        ));
    }
    Ok(dests)
}

/// A regex target with its `$n` filled in: a fixed target, a disabled mark
/// (as a template), or invalid.
fn substituted(re: &RegexRule, user: &str, template: &str) -> TargetSpec {
    let result = if has_substitution(template) {
        substitute(re, user, template)
    } else {
        template.to_owned()
    };
    if result.starts_with('!') {
        return TargetSpec::Template(result);
    }
    if result.len() > MAX_SUBSTITUTION {
        return TargetSpec::Invalid;
    }
    parse_target(&result).map_or(TargetSpec::Invalid, TargetSpec::Fixed)
}

fn has_substitution(t: &str) -> bool {
    let b = t.as_bytes();
    b.windows(2)
        .any(|w| w[0] == b'$' && (w[1].is_ascii_digit() && w[1] != b'0' || b"$&`'".contains(&w[1])))
}

/// JavaScript's `user.replace(regex, template)`: the matched part (every
/// match with `g`) replaced by the template with `$1`…`$9`, `$&`, `` $` ``,
/// `$'` and `$$` expanded; the rest of `user` kept.
fn substitute(re: &RegexRule, user: &str, template: &str) -> String {
    let mut out = String::new();
    let mut last = 0;
    for caps in re.regex.captures_iter(user) {
        let Some(m) = caps.get(0) else { continue };
        out.push_str(&user[last..m.start()]);
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            match chars.peek().copied() {
                Some('$') => out.push('$'),
                Some('&') => out.push_str(m.as_str()),
                Some('`') => out.push_str(&user[..m.start()]),
                Some('\'') => out.push_str(&user[m.end()..]),
                Some(d @ '1'..='9') => {
                    let n = d as usize - '0' as usize;
                    if n < caps.len() {
                        out.push_str(caps.get(n).map_or("", |g| g.as_str()));
                    } else {
                        out.push('$');
                        out.push(d);
                    }
                }
                _ => {
                    out.push('$');
                    continue;
                }
            }
            chars.next();
            if out.len() > MAX_SUBSTITUTION {
                return out;
            }
        }
        last = m.end();
        if !re.global {
            break;
        }
    }
    out.push_str(&user[last..]);
    out
}

/// A target as a destination of `user`: a domain or IP becomes
/// `user@domain` / `user@[ip]`. A catch-all domain carries the `+tag`,
/// an `alias:domain` target does not (as the reference does).
fn dest(target: Target, user: &str, catch_all: bool) -> Option<Dest> {
    let (target, taggable) = match target {
        Target::Address(a) => (Destination::Address(a), true),
        Target::Domain(d) => (Destination::Address(format!("{user}@{d}")), catch_all),
        Target::Ip(ip) => (Destination::Address(format!("{user}@[{ip}]")), false),
        Target::Url(u) => (Destination::Webhook(u), false),
    };
    if let Destination::Address(a) = &target
        && parse_target(a).is_none()
    {
        // `user` itself made it invalid (e.g. a quote in the local part).
        return None;
    }
    Some(Dest { target, taggable })
}

/// `User+x@D` → `user@d`.
fn plus_stripped(address: &str) -> String {
    let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
    let user = local.split('+').next().unwrap_or(local);
    format!("{}@{}", user.to_lowercase(), domain.to_lowercase())
}

/// Plus-addressing, then de-duplication (case-insensitive; `u+x@d` goes
/// when `u@d` is there too).
fn finish(dests: Vec<Dest>, tag: Option<&str>) -> Vec<Destination> {
    let mut out: Vec<Destination> = Vec::new();
    for d in dests {
        let target = match (d.target, tag) {
            (Destination::Address(a), Some(tag)) if d.taggable && !tag.is_empty() => {
                let (local, domain) = a.rsplit_once('@').unwrap_or((a.as_str(), ""));
                let user = local.split('+').next().unwrap_or(local);
                Destination::Address(format!("{user}+{tag}@{domain}"))
            }
            (t, _) => t,
        };
        let same = |x: &Destination| match (x, &target) {
            (Destination::Address(a), Destination::Address(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        };
        if !out.iter().any(same) {
            out.push(target);
        }
    }
    let plain: Vec<String> = out
        .iter()
        .filter_map(|d| match d {
            Destination::Address(a) if !a.split('@').next().unwrap_or("").contains('+') => {
                Some(a.to_lowercase())
            }
            _ => None,
        })
        .collect();
    out.retain(|d| match d {
        Destination::Address(a) if a.split('@').next().unwrap_or("").contains('+') => {
            !plain.contains(&plus_stripped(a))
        }
        _ => true,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, global: bool) -> RegexRule {
        RegexRule {
            regex: regex::Regex::new(pattern).unwrap(),
            global,
        }
    }

    #[test]
    fn substitution_follows_javascript_replace() {
        assert_eq!(substitute(&rule("-", true), "a-b-c", "_$&_"), "a_-_b_-_c");
        assert_eq!(substitute(&rule("-", false), "a-b-c", "_$&_"), "a_-_b-c");
        assert_eq!(
            substitute(&rule("b", false), "abc", "[$`|$'|$$]"),
            "a[a|c|$]c"
        );
        assert_eq!(substitute(&rule("(a)(b)?", false), "ac", "$1$2$3"), "a$3c");
        assert_eq!(substitute(&rule("x", false), "abc", "$1"), "abc");
        assert!(
            has_substitution("u+$1@d")
                && has_substitution("$&")
                && !has_substitution("a$0@b")
                && !has_substitution("a$x")
        );
    }
}
