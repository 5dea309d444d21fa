//! The documentation moves with the code: both man pages render without a
//! warning, every option is in mxguard.yaml(5) and at its default in
//! etc/mxguard.yaml, and mxguard(8) names every command, exit status and
//! metric.

use std::{path::Path, process::Command};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The page's text with roff font escapes and escaped hyphens removed.
fn plain(rel: &str) -> String {
    read(rel)
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "")
        .replace("\\fP", "")
}

#[test]
fn man_pages_render_without_warnings() {
    for page in ["man/mxguard.8", "man/mxguard.yaml.5"] {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(root().join(page))
            .env("MANWIDTH", "80")
            .env_remove("MAN_KEEP_FORMATTING")
            .output()
            .unwrap_or_else(|e| {
                panic!("man is not installed ({e}): apt-get install -y man-db groff-base (the README's test command does this)")
            });
        assert!(
            out.status.success(),
            "{page}: man failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{page} renders with warnings:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.len() > 1000, "{page} rendered almost nothing");
    }
}

/// Dotted paths of every option: a non-empty mapping recurses, anything
/// else (including an empty mapping) is an option.
fn option_paths(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                option_paths(&path, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

fn default_paths() -> Vec<String> {
    let v =
        serde_yaml::to_value(mxguard::config::Config::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut paths = Vec::new();
    option_paths("", &v, &mut paths);
    paths
}

#[test]
fn every_option_is_documented_in_the_config_man_page() {
    let page = plain("man/mxguard.yaml.5");
    let missing: Vec<_> = default_paths()
        .into_iter()
        .filter(|p| !page.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "options missing from man/mxguard.yaml.5: {missing:?}"
    );
}

#[test]
fn the_example_configuration_shows_every_option_at_its_default() {
    let example: serde_yaml::Value = serde_yaml::from_str(&read("etc/mxguard.yaml"))
        .unwrap_or_else(|e| panic!("etc/mxguard.yaml: {e}"));
    let defaults =
        serde_yaml::to_value(mxguard::config::Config::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut shown = Vec::new();
    option_paths("", &example, &mut shown);
    let missing: Vec<_> = default_paths()
        .into_iter()
        .filter(|p| !shown.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "options missing from etc/mxguard.yaml: {missing:?}"
    );
    let loaded = mxguard::config::Config::load(&root().join("etc/mxguard.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded,
        mxguard::config::Config::default(),
        "etc/mxguard.yaml must show the defaults"
    );
    assert_eq!(
        serde_yaml::to_value(&loaded).unwrap_or_else(|e| panic!("{e}")),
        defaults,
        "etc/mxguard.yaml must show the defaults"
    );
}

#[test]
fn the_daemon_man_page_names_commands_exit_statuses_and_metrics() {
    let page = plain("man/mxguard.8");
    for word in [
        "mxguard run",
        "mxguard check-config",
        "--version",
        "SIGHUP",
        "SIGTERM",
        "MXGUARD_LOG",
    ] {
        assert!(page.contains(word), "man/mxguard.8 does not mention {word}");
    }
    for status in ["0", "1", "2", "78"] {
        assert!(
            page.contains(&format!(".TP\n.B {status}\n")),
            "man/mxguard.8 does not document exit status {status}"
        );
    }
    let metrics_rs = read("src/metrics.rs");
    let names: Vec<String> = metrics_rs
        .split("Opts::new(")
        .skip(1)
        .filter_map(|s| s.trim_start().strip_prefix('"')?.split('"').next())
        .map(|n| format!("mxguard_{n}"))
        .collect();
    assert!(
        names.len() == 8,
        "metric names not found in src/metrics.rs: {names:?}"
    );
    for n in names {
        assert!(
            page.contains(&n),
            "man/mxguard.8 does not document the metric {n}"
        );
    }
}
