//! The one DNS resolver of the daemon: mail-auth's authenticator over
//! hickory, with the name servers and timeout of `dns:` (so tests and sites
//! can point it at a resolver of their own, on any port).

use crate::config::{DnsConfig, parse_nameserver};
use mail_auth::{
    MessageAuthenticator,
    hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts},
};

pub fn authenticator(config: &DnsConfig) -> Result<MessageAuthenticator, String> {
    let mut options = ResolverOpts::default();
    options.timeout = config.timeout.get();
    options.attempts = 1;
    options.cache_size = config.cache_size;
    options.negative_max_ttl = Some(config.negative_ttl_max.get());
    if config.nameservers.is_empty() {
        let (resolvers, _) = mail_auth::hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?;
        return MessageAuthenticator::new(resolvers, options)
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"));
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
    MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), options)
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}
