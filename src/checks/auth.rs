//! SPF, DKIM, ARC and DMARC at the end of the message (mail-auth), the
//! decisions the reference makes on them (behaviour.md §7.5), the
//! Authentication-Results header, friendly-from, and ARC sealing.

use crate::{
    config::{ArcConfig, AuthConfig},
    envelope::Envelope,
    verdict::{Reply, Verdict},
};
use mail_auth::{
    ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult,
    MessageAuthenticator, SpfResult,
    arc::ArcSealer,
    common::{
        crypto::{Ed25519Key, RsaKey, Sha256},
        headers::HeaderWriter,
    },
    dkim::Done,
    dmarc::{Policy, verify::DmarcParameters},
    spf::verify::SpfParameters,
};
use std::net::IpAddr;

pub const NAME: &str = "auth";

/// What the authentication found, for the decision and the rewrites.
#[derive(Default)]
pub struct AuthFindings<'a> {
    /// The Authentication-Results value (authserv-id first).
    pub header: String,
    /// The same results, for ARC-Authentication-Results when sealing.
    pub results: Option<AuthenticationResults<'a>>,
    /// A refusal, with the reason for the log.
    pub refusal: Option<(Verdict, String)>,
    pub from_domain: String,
    /// The From domain publishes `p=quarantine` or `p=reject`.
    pub strict_dmarc: bool,
    /// Some passing DKIM signature is aligned with From.
    pub dkim_aligned: bool,
    /// One line for the log: `spf=pass dkim=pass arc=none dmarc=pass`.
    pub summary: String,
}

fn root(domain: &str) -> String {
    let d = domain.trim_end_matches('.').to_lowercase();
    psl::domain_str(&d).map_or(d.clone(), str::to_owned)
}

/// Verifies the message. `None` when there is nothing to verify against
/// (no client address: mail Postfix made itself).
pub async fn authenticate<'a>(
    resolver: &MessageAuthenticator,
    config: &AuthConfig,
    authserv_id: &'a str,
    hostname: &str,
    env: &Envelope,
    raw: &[u8],
) -> Option<AuthFindings<'a>> {
    let ip: IpAddr = env.client_addr?;
    let Some(message) = AuthenticatedMessage::parse(raw) else {
        return Some(AuthFindings {
            refusal: Some((
                Verdict::Reject(Reply::new(550, "5.6.0", "Headers unable to be parsed")),
                "the header block does not parse".into(),
            )),
            ..AuthFindings::default()
        });
    };
    let helo = env.helo.clone().unwrap_or_else(|| format!("[{ip}]"));
    let sender = env.sender.clone().unwrap_or_default();
    // SPF of HELO (reported), and of MAIL FROM (decides; HELO's again for
    // the null sender).
    let spf_helo = resolver
        .verify_spf(SpfParameters::verify_ehlo(ip, &helo, hostname))
        .await;
    let spf = if sender.is_empty() {
        spf_helo.clone()
    } else {
        resolver
            .verify_spf(SpfParameters::verify_mail_from(
                ip, &helo, hostname, &sender,
            ))
            .await
    };
    let dkim = resolver.verify_dkim(&message).await;
    let arc = resolver.verify_arc(&message).await;
    let mail_from_domain = sender
        .rsplit_once('@')
        .map_or(helo.as_str(), |(_, d)| d)
        .to_owned();
    let dmarc = resolver
        .verify_dmarc(DmarcParameters::new(
            &message,
            &dkim,
            &mail_from_domain,
            &spf,
        ))
        .await;
    let from = message.from().to_owned();
    let from_domain = from.rsplit_once('@').map_or("", |(_, d)| d).to_lowercase();
    let mut results = AuthenticationResults::new(authserv_id).with_dkim_results(&dkim, &from);
    results = results.with_spf_ehlo_result(&spf_helo, ip, &helo);
    if !sender.is_empty() {
        results = results.with_spf_mailfrom_result(&spf, ip, &sender, &helo);
    }
    let results = results.with_arc_result(&arc, ip).with_dmarc_result(&dmarc);
    let dkim_aligned = !from_domain.is_empty()
        && dkim.iter().any(|d| {
            d.result() == &DkimResult::Pass
                && d.signature()
                    .is_some_and(|s| root(&s.d) == root(&from_domain))
        });
    let trusted_arc = arc.result() == &DkimResult::Pass
        && arc.sets().last().is_some_and(|set| {
            config
                .trusted_arc_sealers
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&set.seal.header.d))
        });
    let policy = dmarc.policy();
    let dmarc_result = dmarc.result();
    let summary = format!(
        "spf={} dkim={} arc={} dmarc={} policy={policy:?}",
        spf_label(spf.result()),
        if dkim_aligned {
            "pass-aligned"
        } else if dkim.iter().any(|d| d.result() == &DkimResult::Pass) {
            "pass"
        } else if dkim.is_empty() {
            "none"
        } else {
            "fail"
        },
        dkim_label(arc.result()),
        dmarc_label(&dmarc_result),
    );
    let refusal = decide(
        config,
        &from_domain,
        spf.result(),
        &dmarc_result,
        policy,
        dkim_aligned,
        trusted_arc,
    );
    Some(AuthFindings {
        header: results.to_string().replace("\r\n", "\n"),
        results: Some(results),
        refusal,
        strict_dmarc: matches!(policy, Policy::Quarantine | Policy::Reject),
        from_domain,
        dkim_aligned,
        summary,
    })
}

/// The reference's decisions, in its order: DNS trouble, DMARC reject
/// (unless a trusted ARC chain passed), SPF hard fail.
fn decide(
    config: &AuthConfig,
    from_domain: &str,
    spf: SpfResult,
    dmarc: &DmarcResult,
    policy: Policy,
    dkim_aligned: bool,
    trusted_arc: bool,
) -> Option<(Verdict, String)> {
    let dns_trouble = matches!(dmarc, DmarcResult::TempError(_))
        || (spf == SpfResult::TempError && !dkim_aligned && policy == Policy::Reject);
    if dns_trouble && !trusted_arc {
        return Some((
            Verdict::Tempfail(Reply::new(
                451,
                "4.4.3",
                "A DNS lookup for the sender's authentication failed; try again later",
            )),
            "DNS temporary error during SPF or DMARC".into(),
        ));
    }
    if config.dmarc_reject
        && matches!(dmarc, DmarcResult::Fail(_))
        && policy == Policy::Reject
        && !trusted_arc
    {
        return Some((
            Verdict::Reject(Reply::new(
                550,
                "5.7.1",
                format!(
                    "The email sent has failed DMARC validation and is rejected due to the DMARC policy of {from_domain}"
                ),
            )),
            format!("DMARC fail, p=reject at {from_domain}"),
        ));
    }
    if config.spf_reject
        && spf == SpfResult::Fail
        && !dkim_aligned
        && matches!(dmarc, DmarcResult::None)
        && !trusted_arc
    {
        return Some((
            Verdict::Reject(Reply::new(
                550,
                "5.7.23",
                "The email sent has failed SPF validation and is rejected due to the domain's SPF hard fail policy (ensure that your messages have a DKIM aligned signature with your From header)",
            )),
            "SPF fail without an aligned DKIM signature".into(),
        ));
    }
    None
}

fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_label(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

/// The From header friendly-from writes: the original display name (or
/// the original address) with the operator's address.
pub fn friendly_from(original: &str, address: &str) -> String {
    let original = original.trim();
    let name = match original.rfind('<') {
        Some(i) if i > 0 => original[..i].trim().trim_matches('"').trim().to_owned(),
        _ => crate::checks::content::from_address(original).unwrap_or_default(),
    };
    let name: String = name
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect();
    format!("\"{name}\" <{address}>")
}

/// The ARC sealer of the configuration.
pub enum Sealer {
    Ed25519(ArcSealer<Ed25519Key, Done>),
    Rsa(ArcSealer<RsaKey<Sha256>, Done>),
}

/// The headers an ARC-Message-Signature covers (those present).
const SEALED_HEADERS: [&str; 9] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
];

impl Sealer {
    /// Loads the key: Ed25519 (PKCS#8 PEM) or RSA (PKCS#1 or PKCS#8 PEM).
    pub fn from_config(config: &ArcConfig) -> Result<Option<Sealer>, String> {
        let Some(path) = config
            .key_file
            .as_ref()
            .filter(|_| !config.domain.is_empty())
        else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("arc.key_file {}: {e}", path.display()))?;
        // `openssl genpkey -algorithm ed25519` writes PKCS#8 v1 (no public
        // key), which the checked constructor refuses.
        if let Ok(key) = Ed25519Key::from_pkcs8_maybe_unchecked_der(&pem_der(&pem)) {
            return Ok(Some(Sealer::Ed25519(
                ArcSealer::from_key(key)
                    .domain(config.domain.clone())
                    .selector(config.selector.clone())
                    .headers(SEALED_HEADERS),
            )));
        }
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            format!(
                "arc.key_file {}: not a PEM private key: {e}",
                path.display()
            )
        })?;
        let rsa = RsaKey::<Sha256>::from_key_der(der).map_err(|e| {
            format!(
                "arc.key_file {}: neither an Ed25519 nor an RSA private key in PEM: {e}",
                path.display()
            )
        })?;
        Ok(Some(Sealer::Rsa(
            ArcSealer::from_key(rsa)
                .domain(config.domain.clone())
                .selector(config.selector.clone())
                .headers(SEALED_HEADERS),
        )))
    }

    /// The ARC set (ARC-Seal, ARC-Message-Signature,
    /// ARC-Authentication-Results, as `(name, value)`, top first) for the
    /// message as it will leave.
    pub async fn seal(
        &self,
        resolver: &MessageAuthenticator,
        final_message: &[u8],
        results: &AuthenticationResults<'_>,
    ) -> Result<Vec<(String, String)>, String> {
        let message = AuthenticatedMessage::parse(final_message)
            .ok_or("the message to seal does not parse")?;
        let arc: ArcOutput = resolver.verify_arc(&message).await;
        let set = match self {
            Sealer::Ed25519(s) => s.seal(&message, results, &arc).map(|set| set.to_header()),
            Sealer::Rsa(s) => s.seal(&message, results, &arc).map(|set| set.to_header()),
        }
        .map_err(|e| format!("ARC sealing failed: {e}"))?;
        Ok(split_headers(&set))
    }
}

/// `Name: value\r\n\tmore\r\nName2: ...` → `[(Name, "value\n\tmore"), ...]`.
pub fn split_headers(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.split("\r\n") {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push('\n');
                v.push_str(line);
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.to_owned(), v.trim_start().to_owned()));
        }
    }
    out
}

/// The DER inside a PEM block.
fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key: &str) -> (tempfile::TempDir, ArcConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, key).unwrap();
        let c = ArcConfig {
            domain: "mxguard.test".into(),
            selector: "arc".into(),
            key_file: Some(path),
        };
        (dir, c)
    }

    async fn seal_with(key: &str) -> Vec<(String, String)> {
        let (_dir, c) = config(key);
        let sealer = Sealer::from_config(&c).unwrap().unwrap();
        // No DNS is needed to seal a message that has no ARC set yet.
        let dns = crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".into()],
            ..Default::default()
        };
        let resolver = crate::dns::authenticator(&dns).unwrap();
        let results = AuthenticationResults::new("mx.mxguard.test");
        let msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\n\r\nHi.\r\n";
        sealer.seal(&resolver, msg, &results).await.unwrap()
    }

    #[tokio::test]
    async fn rsa_and_ed25519_keys_seal() {
        let rsa = include_str!("../../tests/data/arc-test-rsa.pem");
        let set = seal_with(rsa).await;
        let names: Vec<&str> = set.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ARC-Seal",
                "ARC-Message-Signature",
                "ARC-Authentication-Results"
            ]
        );
        assert!(
            set[0].1.contains("a=rsa-sha256") && set[0].1.contains("cv=none"),
            "{set:?}"
        );

        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        use base64::Engine as _;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let set = seal_with(&pem).await;
        assert!(set[0].1.contains("a=ed25519-sha256"), "{set:?}");
        // The PKCS#8 v1 that `openssl genpkey -algorithm ed25519` writes.
        let set = seal_with(include_str!("../../tests/data/arc-test-ed25519.pem")).await;
        assert!(set[0].1.contains("a=ed25519-sha256"), "{set:?}");
        assert!(
            set[1].1.contains("d=mxguard.test") && set[1].1.contains("s=arc"),
            "{set:?}"
        );
    }

    #[test]
    fn bad_keys_are_a_configuration_error() {
        let (_dir, c) = config("not a key");
        assert!(Sealer::from_config(&c).is_err());
        let off = ArcConfig::default();
        assert!(Sealer::from_config(&off).unwrap().is_none());
    }

    #[test]
    fn decisions() {
        let c = AuthConfig::default();
        let fail = || DmarcResult::Fail(mail_auth::Error::NotAligned);
        let temp = || DmarcResult::TempError(mail_auth::Error::NotAligned);
        let code = |v: Option<(Verdict, String)>| {
            v.and_then(|(v, _)| v.reply().map(|r| (r.code, r.status)))
        };
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Fail,
                &fail(),
                Policy::Reject,
                false,
                false
            )),
            Some((550, "5.7.1"))
        );
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Fail,
                &fail(),
                Policy::Reject,
                false,
                true
            )),
            None,
            "trusted ARC"
        );
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Pass,
                &fail(),
                Policy::Quarantine,
                false,
                false
            )),
            None
        );
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Fail,
                &DmarcResult::None,
                Policy::Unspecified,
                false,
                false
            )),
            Some((550, "5.7.23"))
        );
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Fail,
                &DmarcResult::None,
                Policy::Unspecified,
                true,
                false
            )),
            None,
            "aligned DKIM"
        );
        assert_eq!(
            code(decide(
                &c,
                "d",
                SpfResult::Pass,
                &temp(),
                Policy::Unspecified,
                false,
                false
            )),
            Some((451, "4.4.3"))
        );
        let off = AuthConfig {
            dmarc_reject: false,
            spf_reject: false,
            ..AuthConfig::default()
        };
        assert_eq!(
            code(decide(
                &off,
                "d",
                SpfResult::Fail,
                &fail(),
                Policy::Reject,
                false,
                false
            )),
            None
        );
    }

    #[test]
    fn friendly_from_keeps_the_display_name() {
        assert_eq!(
            friendly_from("\"Alice A.\" <alice@example.com>", "noreply@fwd.example"),
            "\"Alice A.\" <noreply@fwd.example>"
        );
        assert_eq!(
            friendly_from("alice@example.com", "noreply@fwd.example"),
            "\"alice@example.com\" <noreply@fwd.example>"
        );
        let hostile = friendly_from("Evil\" <x@y> \r\nBcc: z <alice@example.com>", "n@f.example");
        assert!(
            !hostile.contains(['\r', '\n']) && hostile.matches('"').count() == 2,
            "{hostile}"
        );
        assert!(hostile.ends_with("\" <n@f.example>"), "{hostile}");
    }

    #[tokio::test]
    async fn a_header_block_that_does_not_parse_is_refused() {
        let dns = crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".into()],
            ..Default::default()
        };
        let resolver = crate::dns::authenticator(&dns).unwrap();
        let env = Envelope {
            client_addr: "192.0.2.1".parse().ok(),
            ..Envelope::default()
        };
        let c = AuthConfig::default();
        let found = authenticate(
            &resolver,
            &c,
            "mx",
            "mx",
            &env,
            b"\r\nno headers at all\r\n",
        )
        .await
        .unwrap();
        let (v, _) = found.refusal.unwrap();
        assert_eq!(
            v.reply().map(ToString::to_string).as_deref(),
            Some("550 5.6.0 Headers unable to be parsed")
        );
        // Mail without an SMTP client (Postfix's own) is not checked.
        assert!(
            authenticate(
                &resolver,
                &c,
                "mx",
                "mx",
                &Envelope::default(),
                b"From: a@b.example\r\n\r\n"
            )
            .await
            .is_none()
        );
    }
}
