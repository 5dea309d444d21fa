//! The `store` section: where state shared between messages lives.

use super::Duration;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// The embedded store's file.
    pub path: PathBuf,
    /// How often the embedded store writes its changes to `path`: a crash
    /// loses at most the writes of the last interval.
    pub flush_interval: Duration,
    /// How often the embedded store drops expired keys.
    pub purge_interval: Duration,
    /// One Redis server: `redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://`
    /// for TLS, `redis+unix:///PATH`.
    pub url: Option<String>,
    /// The start nodes of a Redis Cluster; exclusive with `url`.
    pub urls: Vec<String>,
    /// Connections to Redis (each one carries many requests at once).
    pub pool_size: usize,
    /// Longest wait for one Redis operation, connecting included.
    pub timeout: Duration,
    /// Put before every Redis key, so several applications can share a Redis.
    pub prefix: String,
    /// A file holding the secret for hashing addresses and domains in keys;
    /// `null`: a random secret generated once and kept in the store.
    pub key_secret_file: Option<PathBuf>,
    /// What a check does when the store fails: `tempfail` or `continue`.
    pub on_error: OnError,
    /// Least time between two log warnings about store failures.
    pub warn_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Embedded,
            path: "/var/lib/mxguard/state.db".into(),
            flush_interval: Duration::from_secs(1),
            purge_interval: Duration::from_secs(60),
            url: None,
            urls: Vec::new(),
            pool_size: 4,
            timeout: Duration::from_secs(1),
            prefix: "mxguard:".into(),
            key_secret_file: None,
            on_error: OnError::Tempfail,
            warn_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Embedded,
    Redis,
}

impl StoreConfig {
    /// Checks that involve more than one value, or that need more than the
    /// value's type; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.get().as_millis();
        if ms(self.flush_interval) < 10 || ms(self.flush_interval) > 60_000 {
            return Err(format!(
                "store.flush_interval is {}: it must be between 10ms and 1m",
                self.flush_interval
            ));
        }
        if ms(self.purge_interval) < 1_000 {
            return Err(format!(
                "store.purge_interval is {}: it must be at least 1s",
                self.purge_interval
            ));
        }
        if ms(self.timeout) < 1 || ms(self.timeout) > 60_000 {
            return Err(format!(
                "store.timeout is {}: it must be between 1ms and 1m",
                self.timeout
            ));
        }
        if ms(self.warn_interval) < 1_000 {
            return Err(format!(
                "store.warn_interval is {}: it must be at least 1s",
                self.warn_interval
            ));
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(format!(
                "store.pool_size is {}: it must be between 1 and 1024",
                self.pool_size
            ));
        }
        if self.prefix.len() > 64
            || self
                .prefix
                .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "store.prefix `{}` must be at most 64 characters, without white space or control characters",
                self.prefix.escape_debug()
            ));
        }
        if let Some(p) = &self.key_secret_file
            && !p.is_absolute()
        {
            return Err(format!(
                "store.key_secret_file `{}` must be an absolute path",
                p.display()
            ));
        }
        match self.backend {
            StoreBackend::Embedded => {
                if self.path.as_os_str().is_empty() || !self.path.is_absolute() {
                    return Err(format!(
                        "store.path `{}` must be an absolute path",
                        self.path.display()
                    ));
                }
                if self.url.is_some() || !self.urls.is_empty() {
                    return Err(
                        "store.url or store.urls is set, but store.backend is embedded: set backend: redis to use Redis".into(),
                    );
                }
            }
            StoreBackend::Redis => match (&self.url, self.urls.is_empty()) {
                (Some(_), false) => {
                    return Err(
                        "store.url and store.urls are both set: use url for one Redis server, urls for the nodes of a Redis Cluster".into(),
                    );
                }
                (None, true) => {
                    return Err(
                        "store.backend is redis but neither store.url nor store.urls is set".into(),
                    );
                }
                (Some(url), true) => check_redis_url("store.url", url)?,
                (None, false) => {
                    for url in &self.urls {
                        check_redis_url("store.urls", url)?;
                    }
                }
            },
        }
        Ok(())
    }
}

/// Parses a Redis URL as the client will; the error hides any password.
fn check_redis_url(option: &str, url: &str) -> Result<(), String> {
    use deadpool_redis::redis::IntoConnectionInfo;
    url.into_connection_info().map(|_| ()).map_err(|e| {
        format!(
            "{option}: invalid Redis URL `{}`: {} (expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://… for TLS, or redis+unix:///PATH)",
            redact_url(url),
            redact_in(url, &e.to_string())
        )
    })
}

/// The configured choice.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Refuse for now with 451 4.3.0: no check is silently skipped, and the
    /// sending server retries later.
    #[default]
    Tempfail,
    /// Skip the check that needed the store and go on with the next one.
    Continue,
}

/// The URL with its password, if any, replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                // `redis://PASSWORD@host` is also read as a password.
                "***".to_owned()
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// `text` with the URL's password, if any, replaced by `***`.
pub fn redact_in(url: &str, text: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let password = authority.rfind('@').map(|at| {
        let userinfo = &authority[..at];
        userinfo.split_once(':').map_or(userinfo, |(_, p)| p)
    });
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<StoreConfig, String> {
        let c: StoreConfig = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    fn err(yaml: &str) -> String {
        match parse(yaml) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults_are_valid_and_read_back() -> Result<(), String> {
        let d = StoreConfig::default();
        d.validate()?;
        let text = serde_yaml::to_string(&d).map_err(|e| e.to_string())?;
        assert_eq!(parse(&text)?, d);
        Ok(())
    }

    #[test]
    fn redis_options() -> Result<(), String> {
        let c = parse(
            "backend: redis\nurl: \"rediss://:s3cret@redis.example:6380/2\"\npool_size: 8\ntimeout: 250ms\non_error: continue\nprefix: \"mx1:\"\n",
        )?;
        assert_eq!(c.backend, StoreBackend::Redis);
        assert_eq!(c.on_error, OnError::Continue);
        assert_eq!(c.timeout.get(), std::time::Duration::from_millis(250));
        let c = parse(
            "backend: redis\nurls: [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n",
        )?;
        assert_eq!(c.urls.len(), 2);
        Ok(())
    }

    #[test]
    fn cross_checks() {
        assert!(err("backend: redis\n").contains("neither store.url nor store.urls"));
        assert!(
            err("backend: redis\nurl: \"redis://a\"\nurls: [\"redis://b\"]\n").contains("both set")
        );
        assert!(err("url: \"redis://a\"\n").contains("backend is embedded"));
        assert!(err("backend: redis\nurl: \"redis://a\"\npool_size: 0\n").contains("pool_size"));
        assert!(err("flush_interval: 0s\n").contains("flush_interval"));
        assert!(err("path: state.db\n").contains("absolute"));
        assert!(err("on_error: panic\n").contains("expected `tempfail` or `continue`"));
        assert!(err("backend: sqlite\n").contains("unknown variant `sqlite`"));
        assert!(err("colour: blue\n").contains("unknown field `colour`"));
    }

    #[test]
    fn bad_url_hides_the_password() {
        let e = err("backend: redis\nurl: \"http://:hunter2@example\"\n");
        assert!(e.contains("invalid Redis URL"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
