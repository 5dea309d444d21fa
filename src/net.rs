//! Listening sockets shared by the front ends: TCP or unix, bound from a
//! `ListenAddr`; every accepted TCP connection is a [`Tcp`] stream.
//!
//! Over TCP a milter peer writes small packets that get no reply (the
//! macros before each command). If we delay their ACK (Linux waits up to
//! 40 ms), the peer's Nagle algorithm holds its next small write (the
//! command) until that ACK comes: 40 ms lost several times per message,
//! measured at 235 ms per session with 2 KB messages. So [`Tcp`] asks
//! for an immediate ACK after every read (`TCP_QUICKACK`, which Linux
//! clears again by itself), and sets `TCP_NODELAY` for our own replies.

use crate::config::{ListenAddr, SocketMode};
use std::{
    future::Future,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
};

pub type Stream = indymilter::EitherStream<Tcp, UnixStream>;

/// An accepted TCP connection that never delays its ACKs (see the module
/// documentation).
#[derive(Debug)]
pub struct Tcp(TcpStream);

impl Tcp {
    fn new(s: TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        Self(s)
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.peer_addr()
    }

    fn quick_ack(&self) {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and an int option of the right
        // size; failure only means a delayed ACK.
        unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.quick_ack();
        }
        r
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// A bound listening socket. A unix socket file is removed when the
/// listener is dropped.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, UnixPath),
}

/// A unix socket's path, removed from the file system on drop.
#[derive(Debug)]
pub struct UnixPath(PathBuf);

impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds `addr`. For a unix socket, creates its directory if missing,
    /// replaces a stale socket file (never any other kind of file) and sets
    /// the socket's permissions.
    pub async fn bind(addr: &ListenAddr, mode: SocketMode) -> io::Result<Self> {
        match addr {
            ListenAddr::Inet { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(|e| with_context(e, format!("cannot listen on {addr}")))?;
                Ok(Self::Tcp(l))
            }
            ListenAddr::Unix(path) => {
                prepare_unix_path(path)?;
                let l = UnixListener::bind(path)
                    .map_err(|e| with_context(e, format!("cannot listen on {addr}")))?;
                let guard = UnixPath(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.0)).map_err(
                    |e| {
                        with_context(
                            e,
                            format!("cannot set the permissions of {}", path.display()),
                        )
                    },
                )?;
                Ok(Self::Unix(l, guard))
            }
        }
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        Ok(match self {
            Self::Tcp(l) => {
                let a = l.local_addr()?;
                ListenAddr::Inet {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
            }
            Self::Unix(_, p) => ListenAddr::Unix(p.0.clone()),
        })
    }

    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                Ok(Stream::Tcp(Tcp::new(s)))
            }
            Self::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Stream>> {
        match self {
            Self::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Stream::Tcp(Tcp::new(s))),
            Self::Unix(l, _) => l.poll_accept(cx).map_ok(|(s, _)| Stream::Unix(s)),
        }
    }
}

fn prepare_unix_path(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| with_context(e, format!("cannot create {}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(|e| {
            with_context(
                e,
                format!("cannot remove the stale socket {}", path.display()),
            )
        }),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(with_context(
            e,
            format!("cannot inspect {}", path.display()),
        )),
    }
}

fn with_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The milter's listener: stops accepting (and closes the socket) as soon as
/// the daemon begins to stop, while indymilter keeps serving the sessions
/// already open until they finish.
pub struct StoppableListener {
    inner: Option<Listener>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl StoppableListener {
    pub fn new(inner: Listener, mut stop: watch::Receiver<bool>) -> Self {
        let stopped = Box::pin(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        Self {
            inner: Some(inner),
            stopped,
        }
    }
}

impl indymilter::Listener for StoppableListener {
    type Io = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Stream>> {
        if self.inner.is_some() && self.stopped.as_mut().poll(cx).is_ready() {
            self.inner = None;
        }
        match &self.inner {
            Some(l) => l.poll_accept(cx),
            // Never ready again: the caller's own shutdown ends the loop.
            None => Poll::Pending,
        }
    }
}

/// Resolves once the daemon begins to stop (the flag turns true, or its
/// sender is gone).
pub async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Raises the soft limit on open files to the hard limit, as every
/// connection holds one (a policy connection per smtpd process, a milter
/// connection per SMTP session): the usual soft limit of 1024 would refuse
/// connections long before `max_connections`. Returns the limit now in
/// force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into the struct given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let lowered = libc::rlimit {
            rlim_cur: lim.rlim_max.min(1024),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; lowering the soft limit is always allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let now = super::raise_open_files_limit().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(now, lim.rlim_max);
    }
}
