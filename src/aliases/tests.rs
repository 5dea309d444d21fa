//! The reference's worked examples (behaviour.md §8.9, rows T01…T64, with
//! mxguard's decisions where they differ) and more, as one table; then the
//! limits and hostile records.

use super::*;
use crate::{config::Config, verdict::Verdict};
use std::time::Instant;

#[derive(Debug, PartialEq)]
enum Want {
    /// Forwarded to these destinations (webhooks written as their URL).
    To(&'static [&'static str]),
    /// Forwarded on a custom port.
    Port(&'static [&'static str], u16),
    Discard,
    /// Refused: code, enhanced status, the reply's text.
    No(u16, &'static str, &'static str),
    NotHandled,
}
use Want::*;

const DOMAIN: &str = "example.com";

fn aliases(records: &[&str], yaml: &str) -> Aliases {
    let config = Config::parse(yaml, "test").unwrap_or_else(|e| panic!("{e}"));
    Aliases::new(&config, None, Arc::new(TxtCache::new(100)))
        .offline(DOMAIN, records.iter().map(|r| (*r).to_owned()).collect())
}

async fn check(row: &str, records: &[&str], yaml: &str, rcpt: &str, want: &Want) {
    let r = aliases(records, yaml).resolve(rcpt).await;
    let got = match &r.outcome {
        Outcome::NotHandled => NotHandled,
        Outcome::Discard => Discard,
        Outcome::Refuse(Verdict::Tempfail(reply) | Verdict::Reject(reply)) => match want {
            No(code, status, text)
                if reply.code == *code && reply.status == *status && reply.text == *text =>
            {
                return;
            }
            _ => panic!(
                "{row}: {rcpt} with {records:?}: got {reply} ({}), want {want:?}",
                r.reason
            ),
        },
        Outcome::Refuse(v) => panic!("{row}: unexpected verdict {v:?}"),
        Outcome::Forward { destinations, port } => {
            let got: Vec<String> = destinations.iter().map(ToString::to_string).collect();
            let expected: Option<(&[&str], Option<u16>)> = match want {
                To(t) => Some((t, None)),
                Port(t, p) => Some((t, Some(*p))),
                _ => None,
            };
            match expected {
                Some((t, p)) if got == *t && *port == p => return,
                _ => panic!(
                    "{row}: {rcpt} with {records:?}: got {got:?} port {port:?} ({}), want {want:?}",
                    r.reason
                ),
            }
        }
    };
    assert_eq!(&got, want, "{row}: {rcpt} with {records:?}: {}", r.reason);
}

const NOT_EXIST: fn(&'static str) -> Want = |text| No(550, "5.1.1", text);

#[tokio::test]
async fn the_reference_table_and_more() {
    let fe = |s: &'static str| s;
    let eleven: Vec<String> = (1..=11).map(|i| format!("hello:{i}@gmail.com")).collect();
    let eleven = format!("forward-email={}", eleven.join(","));
    let ten: Vec<String> = (1..=10).map(|i| format!("hello:{i}@gmail.com")).collect();
    let ten = format!("forward-email={}", ten.join(","));
    let eleven: &'static str = Box::leak(eleven.into_boxed_str());
    let ten: &'static str = Box::leak(ten.into_boxed_str());
    let ten_targets: &'static [&'static str] = Box::leak(
        (1..=10)
            .map(|i| &*Box::leak(format!("{i}@gmail.com").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let table: Vec<(&str, Vec<&str>, &str, &str, Want)> = vec![
        (
            "T01",
            vec!["forward-email=user@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T02",
            vec!["forward-email=user@gmail.com"],
            "",
            "Hello+News@example.com",
            To(&["user+News@gmail.com"]),
        ),
        (
            "T03",
            vec!["forward-email=hello:user@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T04",
            vec!["forward-email=hello:user@gmail.com"],
            "",
            "HELLO@EXAMPLE.COM",
            To(&["user@gmail.com"]),
        ),
        (
            "T05",
            vec!["forward-email=hello:user@gmail.com"],
            "",
            "other@example.com",
            NOT_EXIST("other@example.com does not exist"),
        ),
        (
            "T06",
            vec!["forward-email=hello:user@gmail.com"],
            "",
            "hello+test@example.com",
            To(&["user+test@gmail.com"]),
        ),
        (
            "T07",
            vec!["forward-email=hello:user+a@gmail.com"],
            "",
            "hello+test@example.com",
            To(&["user+test@gmail.com"]),
        ),
        (
            "T08",
            vec!["forward-email=hello:user+a@gmail.com"],
            "",
            "hello@example.com",
            To(&["user+a@gmail.com"]),
        ),
        (
            "T09",
            vec!["forward-email=hello:user@gmail.com,support:user@gmail.com"],
            "",
            "support@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T10",
            vec![
                "forward-email=hello:a@gmail.com",
                "forward-email=hello:b@gmail.com",
            ],
            "",
            "hello@example.com",
            To(&["a@gmail.com", "b@gmail.com"]),
        ),
        (
            "T11",
            vec!["forward-email=hello:a@gmail.com,hello:b@gmail.com"],
            "",
            "hello@example.com",
            To(&["a@gmail.com", "b@gmail.com"]),
        ),
        (
            "T12",
            vec!["forward-email=hello:a@gmail.com,b@gmail.com"],
            "",
            "hello@example.com",
            To(&["a@gmail.com"]),
        ),
        (
            "T13",
            vec!["forward-email=hello:a@gmail.com,b@gmail.com"],
            "",
            "bob@example.com",
            To(&["b@gmail.com"]),
        ),
        (
            "T14",
            vec!["forward-email=a@gmail.com,b@gmail.com"],
            "",
            "x@example.com",
            To(&["a@gmail.com", "b@gmail.com"]),
        ),
        (
            "T15",
            vec!["forward-email=example.net"],
            "",
            "hello@example.com",
            To(&["hello@example.net"]),
        ),
        (
            "T16",
            vec!["forward-email=example.net"],
            "",
            "hello+x@example.com",
            To(&["hello+x@example.net"]),
        ),
        (
            "T17",
            vec!["forward-email=hello:https://hooks.example.org/in"],
            "",
            "hello@example.com",
            To(&["https://hooks.example.org/in"]),
        ),
        (
            "T18",
            vec!["forward-email=https://hooks.example.org/in"],
            "",
            "a@example.com",
            To(&["https://hooks.example.org/in"]),
        ),
        (
            "T19",
            vec!["forward-email=hello:user@gmail.com,hello:https://hooks.example.org/in"],
            "",
            "hello@example.com",
            To(&["user@gmail.com", "https://hooks.example.org/in"]),
        ),
        (
            "T20",
            vec![r"forward-email=/^(linus|torvalds)$/:user@gmail.com"],
            "",
            "torvalds@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T21",
            vec![r"forward-email=/^(linus|torvalds)$/:user@gmail.com"],
            "",
            "linus2@example.com",
            NOT_EXIST("linus2@example.com does not exist"),
        ),
        (
            "T22",
            vec![r"forward-email=/^([a-z]+)\.([a-z]+)$/:$1.$2@company.com"],
            "",
            "John.Smith@example.com",
            To(&["john.smith@company.com"]),
        ),
        (
            "T23",
            vec![r"forward-email=/^(support|info)$/:user+$1@gmail.com"],
            "",
            "info@example.com",
            To(&["user+info@gmail.com"]),
        ),
        (
            "T24",
            vec![r"forward-email=/^(support|info)$/:user+$1@gmail.com"],
            "",
            "info+x@example.com",
            To(&["user+x@gmail.com"]),
        ),
        (
            "T25",
            vec![r"forward-email=/^(.*?)$/:https://example.org/webhook?username=$1"],
            "",
            "Bob@example.com",
            To(&["https://example.org/webhook?username=bob"]),
        ),
        // mxguard applies `i` whatever the ending (decision 3): both forward.
        (
            "T26",
            vec!["forward-email=/SUPPORT/g:user@gmail.com"],
            "",
            "support@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T27",
            vec!["forward-email=/SUPPORT/gi:user@gmail.com"],
            "",
            "support@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T28",
            vec!["forward-email=/^TEST$/:user@gmail.com"],
            "",
            "test@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T29",
            vec!["forward-email=/^a{1,3}$/:x@gmail.com,y@gmail.com"],
            "",
            "aa@example.com",
            To(&["x@gmail.com"]),
        ),
        (
            "T30",
            vec!["forward-email=/^a{1,3}$/:x@gmail.com,y@gmail.com"],
            "",
            "bbb@example.com",
            To(&["y@gmail.com"]),
        ),
        (
            "T31",
            vec![r"forward-email=/^(linus|torvalds)$/:!"],
            "",
            "linus@example.com",
            Discard,
        ),
        (
            "T32",
            vec![r"forward-email=/^(linus|torvalds)$/:!!"],
            "",
            "linus@example.com",
            No(450, "4.2.1", "Mailbox is disabled, try again later"),
        ),
        (
            "T33",
            vec![r"forward-email=/^(linus|torvalds)$/:!!!"],
            "",
            "linus@example.com",
            No(550, "5.1.1", "Mailbox is disabled"),
        ),
        (
            "T34",
            vec!["forward-email=!/^spam/:user@gmail.com,user@gmail.com"],
            "",
            "spammy@example.com",
            Discard,
        ),
        (
            "T35",
            vec!["forward-email=!/^spam/:user@gmail.com,user@gmail.com"],
            "",
            "other@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T36",
            vec!["forward-email=!!!alias:user@gmail.com"],
            "",
            "alias@example.com",
            No(550, "5.1.1", "Mailbox is disabled"),
        ),
        (
            "T37",
            vec!["forward-email=!!!alias:user@gmail.com"],
            "",
            "other@example.com",
            NOT_EXIST("other@example.com does not exist"),
        ),
        (
            "T38",
            vec!["forward-email=!!alias"],
            "",
            "alias@example.com",
            No(450, "4.2.1", "Mailbox is disabled, try again later"),
        ),
        (
            "T39",
            vec!["forward-email=!alias,user@gmail.com"],
            "",
            "alias@example.com",
            Discard,
        ),
        (
            "T40",
            vec!["forward-email=!alias,user@gmail.com"],
            "",
            "bob@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T41",
            vec!["forward-email=hello:a@gmail.com,!hello"],
            "",
            "hello@example.com",
            Discard,
        ),
        (
            "T42",
            vec!["forward-email=Hello:User@Gmail.COM"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T43",
            vec!["forward-email=hello:a@gmail.com,hello:A@GMAIL.COM"],
            "",
            "hello@example.com",
            To(&["a@gmail.com"]),
        ),
        // A loop is named as one (5.4.6) rather than "Invalid recipients".
        (
            "T44",
            vec!["forward-email=a:b@example.com,b:a@example.com"],
            "",
            "a@example.com",
            No(
                550,
                "5.4.6",
                "Mail for a@example.com is forwarded back to itself (a forwarding loop)",
            ),
        ),
        (
            "T45",
            vec!["forward-email=hello:user@gmail.com,hello:user+x@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T46",
            vec!["forward-email=hello:linus@example.com,linus:user@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T47",
            vec![eleven],
            "",
            "hello@example.com",
            No(
                421,
                "4.4.2",
                "The address hello@example.com is attempted to be forwarded to (11) addresses which exceeds the maximum of (10)",
            ),
        ),
        ("T48", vec![ten], "", "hello@example.com", To(ten_targets)),
        // A bad element never takes the others down: other@ is simply unknown…
        (
            "T49",
            vec!["forward-email=hello:notanemail"],
            "",
            "other@example.com",
            NOT_EXIST("other@example.com does not exist"),
        ),
        // …and the alias it names gets the reference's reply.
        (
            "T49b",
            vec!["forward-email=hello:notanemail"],
            "",
            "hello@example.com",
            NOT_EXIST(
                "hello:notanemail domain of example.com has an invalid \"forward-email\" TXT record due to an invalid email address of \"hello:notanemail\"",
            ),
        ),
        (
            "T50",
            vec!["forward-email=,"],
            "",
            "hello@example.com",
            No(
                421,
                "4.4.2",
                "hello@example.com domain of example.com has zero forwarded addresses configured in the TXT record with \"forward-email\"",
            ),
        ),
        (
            "T51",
            vec!["forward-email="],
            "",
            "hello@example.com",
            NOT_EXIST("hello@example.com does not exist"),
        ),
        (
            "T52",
            vec!["Forward-Email=user@gmail.com"],
            "",
            "hello@example.com",
            NOT_EXIST("hello@example.com does not exist"),
        ),
        // Character-strings are joined before parsing (see the DNS test).
        (
            "T53",
            vec!["forward-email=hello:a@gmail.com,world:b@gmail.com"],
            "",
            "world@example.com",
            To(&["b@gmail.com"]),
        ),
        (
            "T54",
            vec!["forward-email-port=2525", "forward-email=example.com"],
            "",
            "hello@example.com",
            Port(&["hello@example.com"], 2525),
        ),
        (
            "T55",
            vec!["forward-email=example.com"],
            "",
            "hello@example.com",
            No(
                550,
                "5.4.6",
                "Mail for hello@example.com is forwarded back to itself (a forwarding loop)",
            ),
        ),
        (
            "T56",
            vec!["forward-email-port=1337", "forward-email=user@gmail.com"],
            "",
            "hello@example.com",
            Port(&["user@gmail.com"], 1337),
        ),
        (
            "T57",
            vec!["forward-email-port=25", "forward-email=user@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T57b",
            vec!["forward-email-port=abc", "forward-email=user@gmail.com"],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        // Plans are not ours (decision 1): verification records are not rules.
        (
            "T58",
            vec![
                fe("forward-email-site-verification=a"),
                "forward-email-site-verification=b",
                "forward-email=user@gmail.com",
            ],
            "",
            "hello@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T61",
            vec!["v=spf1 -all"],
            "",
            "hello@example.com",
            NOT_EXIST("hello@example.com does not exist"),
        ),
        (
            "T62",
            vec!["forward-email=hello:example.net"],
            "",
            "hello+x@example.com",
            To(&["hello@example.net"]),
        ),
        (
            "T63a",
            vec!["forward-email=a:user@gmail.com,!!!b"],
            "",
            "a@example.com",
            To(&["user@gmail.com"]),
        ),
        (
            "T63b",
            vec!["forward-email=a:user@gmail.com,!!!b"],
            "",
            "b@example.com",
            No(550, "5.1.1", "Mailbox is disabled"),
        ),
        (
            "T64",
            vec!["forward-email=a:user@gmail.com,!!c"],
            "",
            "c@example.com",
            No(450, "4.2.1", "Mailbox is disabled, try again later"),
        ),
        // Beyond the table.
        (
            "plus tag not on webhooks",
            vec!["forward-email=https://h.example.org/x"],
            "",
            "a+tag@example.com",
            To(&["https://h.example.org/x"]),
        ),
        (
            "g flag",
            vec!["forward-email=/^(.*)$/g:$1@gmail.com"],
            "",
            "Bob@example.com",
            To(&["bob@gmail.com"]),
        ),
        (
            "unanchored match keeps the rest, as JavaScript's replace",
            vec![r"forward-email=/^([a-z])\./:$1@gmail.com"],
            "",
            "a.b@example.com",
            To(&["a@gmail.comb"]),
        ),
        (
            "target without $ is taken verbatim",
            vec![r"forward-email=/\./:x@gmail.com"],
            "",
            "a.b@example.com",
            To(&["x@gmail.com"]),
        ),
        (
            "$& and $$",
            vec!["forward-email=/^[a-z]+$/:$&@gmail.com"],
            "",
            "Zed@example.com",
            To(&["zed@gmail.com"]),
        ),
        (
            "unmatched group is empty",
            vec!["forward-email=/^(a)|(b)$/:x$2@gmail.com"],
            "",
            "a@example.com",
            To(&["x@gmail.com"]),
        ),
        (
            "substitution making a non-address",
            vec!["forward-email=/^(.*)$/:$1"],
            "",
            "bob@example.com",
            NOT_EXIST(
                "Domain of example.com has an invalid \"forward-email\" TXT record due to an invalid regular expression email address match",
            ),
        ),
        (
            "disabled regex !! wins over a later alias",
            vec!["forward-email=!!/^x/,x1:a@gmail.com"],
            "",
            "x1@example.com",
            No(450, "4.2.1", "Mailbox is disabled, try again later"),
        ),
        (
            "!alias with target",
            vec!["forward-email=!alias:user@gmail.com"],
            "",
            "alias@example.com",
            Discard,
        ),
        (
            "IP target",
            vec!["forward-email=hello:192.0.2.7"],
            "",
            "hello+x@example.com",
            To(&["hello@[192.0.2.7]"]),
        ),
        (
            "catch-all IP",
            vec!["forward-email=192.0.2.7"],
            "",
            "bob@example.com",
            To(&["bob@[192.0.2.7]"]),
        ),
        (
            "several catch-alls",
            vec![
                "forward-email=a@gmail.com",
                "forward-email=example.net,https://h.example.org/",
            ],
            "",
            "z@example.com",
            To(&["a@gmail.com", "z@example.net", "https://h.example.org/"]),
        ),
        (
            "chain through a YAML domain",
            vec!["forward-email=hello:team@example.org"],
            "domains: { example.org: { rules: [\"team:a@gmail.com,team:b@gmail.com\"] } }",
            "hello@example.com",
            To(&["a@gmail.com", "b@gmail.com"]),
        ),
        (
            "YAML domain alone",
            vec![],
            "domains: { example.org: { rules: [\"team:a@gmail.com\"] } }",
            "team@example.org",
            To(&["a@gmail.com"]),
        ),
        (
            "YAML domain, unknown alias",
            vec![],
            "domains: { example.org: { rules: [\"team:a@gmail.com\"] } }",
            "nobody@example.org",
            NOT_EXIST("nobody@example.org does not exist"),
        ),
        (
            "YAML port",
            vec![],
            "domains: { example.org: { rules: [\"a@gmail.com\"], port: 2525 } }",
            "x@example.org",
            Port(&["a@gmail.com"], 2525),
        ),
        (
            "YAML max_forwarded",
            vec![],
            "domains: { example.org: { rules: [\"a@gmail.com,b@gmail.com\"], max_forwarded: 1 } }",
            "x@example.org",
            No(
                421,
                "4.4.2",
                "The address x@example.org is attempted to be forwarded to (2) addresses which exceeds the maximum of (1)",
            ),
        ),
        (
            "a loop beside a good target",
            vec!["forward-email=a:b@example.com,a:z@gmail.com,b:a@example.com"],
            "",
            "a@example.com",
            To(&["z@gmail.com"]),
        ),
        (
            "an alias of a disabled alias stays as written",
            vec!["forward-email=a:b@example.com,!!!b"],
            "",
            "a@example.com",
            To(&["b@example.com"]),
        ),
        (
            "self-alias with other targets",
            vec!["forward-email=a:a@example.com,a:z@gmail.com"],
            "",
            "A+t@example.com",
            To(&["z+t@gmail.com"]),
        ),
        (
            "unknown domain",
            vec![],
            "",
            "someone@elsewhere.example",
            NotHandled,
        ),
        ("no domain", vec![], "", "postmaster", NotHandled),
        (
            "target with CRLF is not a rule",
            vec!["forward-email=hello:a@gmail.com\r\nBcc: evil@x.example"],
            "",
            "hello@example.com",
            NOT_EXIST("hello@example.com does not exist"),
        ),
        (
            "target with NUL is not a rule",
            vec!["forward-email=hello:a@gmail.com\0,bob:b@gmail.com"],
            "",
            "bob@example.com",
            To(&["b@gmail.com"]),
        ),
        (
            "quoted local part not made into a target",
            vec!["forward-email=example.net"],
            "",
            "\"a b\"@example.com",
            NOT_EXIST("\"a b\"@example.com does not exist"),
        ),
    ];
    assert!(table.len() >= 60, "{} rows", table.len());
    for (row, records, yaml, rcpt, want) in &table {
        check(row, records, yaml, rcpt, want).await;
    }
}

#[tokio::test]
async fn chains_are_bounded_in_depth() {
    // a0 → a1 → … → a9 → z: followed for MAX_DEPTH steps, then kept as written.
    let rules: Vec<String> = (0..9)
        .map(|i| format!("a{i}:a{}@example.com", i + 1))
        .collect();
    let record = format!("forward-email={},a9:z@gmail.com", rules.join(","));
    let r = aliases(&[record.as_str()], "")
        .resolve("a0@example.com")
        .await;
    assert_eq!(
        r.outcome,
        Outcome::Forward {
            destinations: vec![Destination::Address(format!(
                "a{}@example.com",
                MAX_DEPTH_SEEN
            ))],
            port: None
        },
        "{}",
        r.reason
    );
}
const MAX_DEPTH_SEEN: usize = resolve::MAX_DEPTH + 1;

#[tokio::test]
async fn dns_trouble_is_a_tempfail() {
    // A domain configured for DNS rules whose records are not available.
    let config = Config::parse("domains: { example.net: { source: dns } }", "t").unwrap();
    let a = Aliases::new(&config, None, Arc::new(TxtCache::new(10))).offline("example.com", vec![]);
    let r = a.resolve("x@example.net").await;
    match r.outcome {
        Outcome::Refuse(Verdict::Tempfail(reply)) => {
            assert_eq!((reply.code, reply.status), (451, "4.4.3"));
            assert_eq!(
                reply.text,
                "Cannot look up where mail for x@example.net goes (DNS trouble); try again later"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ten_thousand_rules_are_cut_at_the_limit() {
    let rules: Vec<String> = (0..10_000)
        .map(|i| format!("u{i}:t{i}@gmail.com"))
        .collect();
    let record = format!("forward-email={}", rules.join(","));
    let started = Instant::now();
    let set = RuleSet::from_txt(&[record], &Limits::default());
    assert_eq!(set.rules.len(), Limits::default().max_rules);
    assert!(
        set.errors
            .iter()
            .any(|e| e.message.contains("more than 1000 rules")),
        "{:?}",
        set.errors
    );
    // Linear work: well under a second even in a debug build.
    assert!(started.elapsed().as_secs() < 5);
}

#[tokio::test]
async fn ten_thousand_rules_still_resolve_the_first_ones() {
    let rules: Vec<String> = (0..10_000)
        .map(|i| format!("u{i}:t{i}@gmail.com"))
        .collect();
    let record = format!("forward-email={}", rules.join(","));
    let a = aliases(&[record.as_str()], "");
    assert_eq!(
        a.resolve("u5@example.com").await.outcome,
        Outcome::Forward {
            destinations: vec![Destination::Address("t5@gmail.com".into())],
            port: None
        }
    );
}

#[test]
fn long_and_costly_regexes_are_refused_and_reported() {
    let long = format!(
        "forward-email=/{}/:a@gmail.com,b:b@gmail.com",
        "a".repeat(5000)
    );
    let set = RuleSet::from_txt(&[long], &Limits::default());
    assert_eq!(set.rules.len(), 1, "the other element survives");
    assert!(
        set.errors[0].message.contains("longer than"),
        "{:?}",
        set.errors
    );
    assert_eq!(set.errors[0].position, "forward-email=".len());

    // Compiles to far more than the size limit.
    let huge = r"forward-email=/(\w{100}){100}/:a@gmail.com";
    let set = RuleSet::from_txt(&[huge], &Limits::default());
    assert!(set.rules.is_empty());
    assert!(
        set.errors[0].message.contains("invalid regex"),
        "{:?}",
        set.errors
    );

    let bad = "forward-email=/(unclosed/:a@gmail.com";
    let set = RuleSet::from_txt(&[bad], &Limits::default());
    assert!(
        set.errors[0].message.contains("invalid regex"),
        "{:?}",
        set.errors
    );

    // More regexes than allowed: the first ones are kept.
    let many: Vec<String> = (0..200).map(|i| format!("/^r{i}$/:a@gmail.com")).collect();
    let set = RuleSet::from_txt(
        &[format!("forward-email={}", many.join(","))],
        &Limits::default(),
    );
    assert_eq!(set.rules.len(), Limits::default().max_regexes);
}

#[tokio::test]
async fn catastrophic_looking_patterns_match_in_linear_time() {
    let a = aliases(
        &["forward-email=/^(a+)+$/:x@gmail.com,/^(a|a)*b$/:y@gmail.com,/(.*a){20}/:z@gmail.com"],
        "",
    );
    let user = format!("{}!@example.com", "a".repeat(60));
    let started = Instant::now();
    for _ in 0..100 {
        let r = a.resolve(&user).await;
        assert_eq!(r.label(), "forward", "{}", r.reason);
    }
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
}

#[test]
fn bad_elements_are_reported_with_record_and_position() {
    let record =
        "forward-email=ok:a@gmail.com,hello:notanemail,hello:a@b,/x/:ftp://x.y, junk ,!!!:x@y.z";
    let set = RuleSet::from_txt(&[record], &Limits::default());
    let report: Vec<(usize, &str)> = set
        .errors
        .iter()
        .map(|e| (e.position, e.record.as_str()))
        .collect();
    assert!(report.iter().all(|(_, r)| *r == record));
    let positions: Vec<usize> = report.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, [29, 46, 56, 71, 77], "{:?}", set.errors);
    assert_eq!(&record[29..45], "hello:notanemail");
}

#[test]
fn yaml_rules_are_checked_at_load() {
    let e = Config::parse(
        "domains: { example.org: { rules: [\"a:not an address\"] } }",
        "f",
    );
    let text = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("domains.example.org.rules") && text.contains("position 0"),
        "{text}"
    );
}

#[tokio::test]
async fn yaml_rules_are_operator_data_and_not_cut_at_the_dns_limit() {
    let rules: Vec<String> = (0..5_000)
        .map(|i| format!("\"u{i}:t{i}@gmail.com\""))
        .collect();
    let yaml = format!(
        "domains: {{ example.org: {{ rules: [{}] }} }}",
        rules.join(",")
    );
    let config = Config::parse(&yaml, "f").unwrap_or_else(|e| panic!("{e}"));
    let a = Aliases::new(&config, None, Arc::new(TxtCache::new(100)));
    assert_eq!(
        a.resolve("u4999@example.org").await.outcome,
        Outcome::Forward {
            destinations: vec![Destination::Address("t4999@gmail.com".into())],
            port: None
        }
    );
}

#[test]
fn cache_is_bounded() {
    let cache = TxtCache::new(4);
    let later = Instant::now() + std::time::Duration::from_secs(60);
    for i in 0..20 {
        cache.put(
            &format!("d{i}.example"),
            Cached::NoRecords,
            later + std::time::Duration::from_secs(i),
        );
    }
    assert!(cache.len() <= 4, "{}", cache.len());
    assert!(cache.get("d19.example").is_some());
}
