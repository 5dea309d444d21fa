//! The whole chain most end-to-end tests need: mxguard in-process, a sink,
//! and a real Postfix wired to both as contrib/postfix/main.cf says.

use super::{
    daemon::Mxguard,
    postfix::{Postfix, Wiring},
    sink::Sink,
    smtp::{self, Envelope, Transcript},
};

/// Which of mxguard's front ends Postfix is wired to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Both,
    MilterOnly,
}

pub struct Stack {
    pub mxguard: Mxguard,
    pub sink: Sink,
    pub postfix: Postfix,
}

impl Stack {
    /// mxguard with the test configuration plus `yaml`, and Postfix wired to
    /// it. With `Wire::MilterOnly`, `yaml` should also turn the policy
    /// listener off (`policy: { listen: null }`).
    pub async fn start(yaml: &str, wire: Wire) -> Stack {
        let mxguard = Mxguard::start(yaml).await;
        let sink = Sink::start().await.unwrap_or_else(|e| panic!("sink: {e}"));
        let wiring = Wiring {
            policy: (wire == Wire::Both).then(|| mxguard.policy_wiring()),
            milter: Some(mxguard.milter_wiring()),
        };
        let postfix = Postfix::start(sink.addr().port(), &wiring, &[]);
        Stack {
            mxguard,
            sink,
            postfix,
        }
    }

    /// One message from `bob@example.com`, sent by a client posing (XCLIENT)
    /// as `client` named mail.example.com.
    pub async fn send(&self, client: &str, to: &[&str]) -> Transcript {
        let msg = smtp::message(
            "bob@example.com",
            to.first().copied().unwrap_or(""),
            "hello",
            "Hello.\r\n",
        );
        let env = Envelope {
            client_addr: client,
            client_name: "mail.example.com",
            helo: "mail.example.com",
            from: "bob@example.com",
            to,
        };
        smtp::send(self.postfix.smtpd_addr(), &env, &msg)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"))
    }
}
