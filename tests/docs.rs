//! The documentation moves with the code: both man pages render without a
//! single groff warning, mxguard.yaml(5) names every option of the default
//! configuration, etc/mxguard.yaml shows every option at its default, and
//! mxguard(8) names every command, exit status and metric.

use mxguard::config::Config;
use serde_yaml::Value;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

const DAEMON_PAGE: &str = "man/mxguard.8";
const CONFIG_PAGE: &str = "man/mxguard.yaml.5";
const EXAMPLE_CONFIG: &str = "etc/mxguard.yaml";

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The raw roff source with escaped hyphens made plain and the font
/// escapes removed, so `\fBmilter.listen\fR` reads `milter.listen`.
fn page_text(rel: &str) -> String {
    read(rel)
        .replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fR", "")
        .replace("\\fI", "")
        .replace("\\fP", "")
}

fn to_value(config: &Config) -> Value {
    serde_yaml::to_value(config)
        .unwrap_or_else(|e| panic!("cannot serialise the configuration: {e}"))
}

/// Collects the dotted path of every option below `prefix`: a key whose
/// value is a non-empty mapping is a section and recurses; anything else (a
/// scalar, a list, null, an empty mapping) is an option.
fn collect_options(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let full = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect_options(&full, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned(), value.clone());
        }
    }
}

fn options(value: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    collect_options("", value, &mut out);
    out
}

fn default_options() -> BTreeMap<String, Value> {
    options(&to_value(&Config::default()))
}

fn show(v: &Value) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| format!("{v:?}"))
}

#[test]
fn man_pages_render_without_warnings() {
    for page in [DAEMON_PAGE, CONFIG_PAGE] {
        let out = match Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(path(page))
            .env("MANWIDTH", "80")
            .env_remove("MAN_KEEP_FORMATTING")
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "man is not installed: apt-get install -y man-db groff-base (the README's test command does this)"
            ),
            Err(e) => panic!("cannot run man for {page}: {e}"),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "man -l {page} failed ({}):\n{stderr}",
            out.status
        );
        assert!(
            stderr.is_empty(),
            "man -l {page} printed warnings (groff warnings must be fixed):\n{stderr}"
        );
        assert!(
            out.stdout.len() > 2000,
            "man -l {page} rendered only {} bytes",
            out.stdout.len()
        );
    }
}

#[test]
fn every_option_is_documented_in_the_config_page() {
    let text = page_text(CONFIG_PAGE);
    let options = default_options();
    assert!(
        options.contains_key("milter.listen") && options.contains_key("mode"),
        "the option walk found no options: {:?}",
        options.keys().collect::<Vec<_>>()
    );
    let missing: Vec<&String> = options
        .keys()
        .filter(|p| !text.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{CONFIG_PAGE} does not document these options (write each as `section.option`): {missing:?}"
    );
}

#[test]
fn the_example_configuration_shows_every_option_at_its_default() {
    let raw: Value = serde_yaml::from_str(&read(EXAMPLE_CONFIG))
        .unwrap_or_else(|e| panic!("{EXAMPLE_CONFIG} is not YAML: {e}"));
    // Values are compared as mxguard understood them (`127.0.0.1:9190` and
    // `inet:127.0.0.1:9190` are one socket); every option must still be
    // written out in the file itself.
    let loaded = Config::load(&path(EXAMPLE_CONFIG))
        .unwrap_or_else(|e| panic!("{EXAMPLE_CONFIG} does not load: {e}"));
    let missing: Vec<String> = options(&to_value(&Config::default()))
        .into_keys()
        .filter(|p| !options(&raw).contains_key(p))
        .collect();
    assert!(
        missing.is_empty(),
        "{EXAMPLE_CONFIG} does not show the options {missing:?}"
    );
    let example = to_value(&loaded);
    let defaults = to_value(&Config::default());
    if example != defaults {
        let shown = options(&example);
        let wanted = options(&defaults);
        let mut problems = Vec::new();
        for (p, v) in &wanted {
            match shown.get(p) {
                None => problems.push(format!("{p}: missing (default {})", show(v))),
                Some(s) if s != v => problems.push(format!(
                    "{p}: the example has {}, the default is {}",
                    show(s),
                    show(v)
                )),
                Some(_) => {}
            }
        }
        for p in shown.keys().filter(|p| !wanted.contains_key(*p)) {
            problems.push(format!("{p}: in the example, but no such option"));
        }
        panic!(
            "{EXAMPLE_CONFIG} differs from Config::default() (as serialised):\n  {}",
            problems.join("\n  ")
        );
    }
    assert_eq!(
        loaded,
        Config::default(),
        "{EXAMPLE_CONFIG} loads, but not as the defaults"
    );
}

/// The metric names registered in src/metrics.rs: each `Opts::new("name"`
/// or `HistogramOpts::new("name"`, with the registry's `mxguard_` prefix.
fn metric_names() -> Vec<String> {
    read("src/metrics.rs")
        .split("Opts::new(")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.trim_start().strip_prefix('"')?.split('"').next()?;
            Some(format!("mxguard_{name}"))
        })
        .collect()
}

#[test]
fn the_daemon_page_names_commands_exit_statuses_and_metrics() {
    let text = page_text(DAEMON_PAGE);
    for word in [
        "mxguard run",
        "mxguard check-config",
        "mxguard --version",
        "mxguard --help",
    ] {
        assert!(
            text.contains(word),
            "{DAEMON_PAGE} does not mention `{word}`"
        );
    }

    let exit = text
        .split_once(".SH EXIT STATUS\n")
        .map(|(_, rest)| rest.split("\n.SH ").next().unwrap_or(rest))
        .unwrap_or_else(|| panic!("{DAEMON_PAGE} has no EXIT STATUS section"));
    for status in ["0", "1", "2", "78"] {
        assert!(
            exit.contains(&format!(".TP\n.B {status}\n")),
            "{DAEMON_PAGE}: EXIT STATUS has no `.TP` entry for {status}"
        );
    }

    let metrics = metric_names();
    assert!(
        metrics.len() >= 8,
        "found only these metric names in src/metrics.rs: {metrics:?}"
    );
    let missing: Vec<&String> = metrics
        .iter()
        .filter(|m| !text.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{DAEMON_PAGE} does not document these metrics: {missing:?}"
    );
}
