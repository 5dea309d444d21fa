//! `policy.reject_clients`: client addresses the operator refuses outright.

use crate::{
    config::IpNet,
    envelope::Envelope,
    verdict::{Reply, Verdict},
};

/// The check's name in logs and metrics.
pub const NAME: &str = "reject_clients";

pub struct RejectClients {
    nets: Vec<IpNet>,
}

impl RejectClients {
    pub fn new(nets: &[IpNet]) -> Self {
        Self {
            nets: nets.to_vec(),
        }
    }

    /// A refusal, with its reason, when the client address is listed.
    pub fn check(&self, env: &Envelope) -> Option<(Verdict, String)> {
        let ip = env.client_addr?;
        let net = self.nets.iter().find(|n| n.contains(ip))?;
        let reply = Reply::new(
            554,
            "5.7.1",
            format!(
                "Your client address {ip} is refused by this server's policy; \
                 if you think this is a mistake, reach the recipient's postmaster another way"
            ),
        );
        Some((Verdict::Reject(reply), format!("client {ip} matches {net}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(ip: &str) -> Envelope {
        Envelope {
            client_addr: ip.parse().ok(),
            ..Envelope::default()
        }
    }

    #[test]
    fn listed_clients_are_refused_with_554_5_7_1() -> Result<(), String> {
        let check = RejectClients::new(&["192.0.2.0/24".parse()?, "2001:db8::7".parse()?]);
        let (verdict, reason) = check.check(&env("192.0.2.9")).ok_or("not refused")?;
        let reply = verdict.reply().ok_or("no reply")?;
        assert_eq!((reply.code, reply.status), (554, "5.7.1"));
        assert!(
            reply
                .text
                .starts_with("Your client address 192.0.2.9 is refused")
        );
        assert_eq!(reason, "client 192.0.2.9 matches 192.0.2.0/24");
        assert!(check.check(&env("2001:db8::7")).is_some());
        assert!(check.check(&env("2001:db8::8")).is_none());
        assert!(check.check(&env("198.51.100.1")).is_none());
        assert!(check.check(&Envelope::default()).is_none());
        Ok(())
    }
}
