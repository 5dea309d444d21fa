//! The one DNS resolver of the daemon: mail-auth's authenticator over
//! hickory, with the name servers and timeout of `dns:` (so tests and sites
//! can point it at a resolver of their own, on any port).

use crate::config::{DnsConfig, parse_nameserver};
use mail_auth::{
    MessageAuthenticator,
    hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts},
};

pub fn authenticator(config: &DnsConfig) -> Result<MessageAuthenticator, String> {
    if config.nameservers.is_empty() {
        return MessageAuthenticator::new_system_conf()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"));
    }
    let mut servers = Vec::new();
    for ns in &config.nameservers {
        let addr = parse_nameserver(ns)?;
        let mut server = NameServerConfig::udp_and_tcp(addr.ip());
        for c in &mut server.connections {
            c.port = addr.port();
        }
        servers.push(server);
    }
    let mut options = ResolverOpts::default();
    options.timeout = config.timeout.get();
    options.attempts = 1;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), options)
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}
