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
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream},
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
        Self::bind_with_group(addr, mode, None).await
    }

    /// [`Listener::bind`], and then gives a unix socket file to `group`
    /// (`(option, group name)`; the option names it in errors). The group is
    /// looked up before binding, so a wrong name leaves no socket behind.
    pub async fn bind_with_group(
        addr: &ListenAddr,
        mode: SocketMode,
        group: Option<(&str, &str)>,
    ) -> io::Result<Self> {
        let gid = match (addr, group) {
            (ListenAddr::Unix(_), Some((option, name))) => {
                Some((option, name, group_id(option, name)?))
            }
            _ => None,
        };
        match addr {
            ListenAddr::Inet { host, port } => {
                let l = bind_tcp(host, *port)
                    .await
                    .map_err(|e| with_context(e, format!("cannot listen on {addr}")))?;
                Ok(Self::Tcp(l))
            }
            ListenAddr::Unix(path) => {
                prepare_unix_path(path)?;
                let l = UnixListener::bind(path)
                    .map_err(|e| with_context(e, format!("cannot listen on {addr}")))?;
                let guard = UnixPath(path.clone());
                // The group before the mode: the socket is never open to a
                // group it was not meant for.
                if let Some((option, name, gid)) = gid {
                    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                        with_context(
                            e,
                            format!(
                                "{option}: cannot give {} to group {name} (the daemon must be root or a member of {name})",
                                path.display()
                            ),
                        )
                    })?;
                }
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

/// Connections the kernel queues before we accept them (Linux caps it at
/// `net.core.somaxconn`). The default of `TcpListener::bind` (128, as std's)
/// drops the SYNs of a burst, such as every smtpd connecting at once after
/// a reload, and each dropped client waits a second or more to retry.
const TCP_BACKLOG: u32 = 1024;

async fn bind_tcp(host: &str, port: u16) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host((host, port)).await? {
        let socket = if a.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As `TcpListener::bind`: a restart can bind while old connections linger.
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(a) {
            last = Some(e);
            continue;
        }
        return socket.listen(TCP_BACKLOG);
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
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

/// The id of group `name`, from the system's group database (NSS).
fn group_id(option: &str, name: &str) -> io::Result<libc::gid_t> {
    let not_found = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{option}: no group named `{name}` on this host"),
        )
    };
    let cname = std::ffi::CString::new(name).map_err(|_| not_found())?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: all-zero is a valid `struct group` (null pointers, gid 0).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, a struct and a buffer of the length
        // given, all alive for the call; the strings it fills in point into
        // `buf`, and only the gid is read.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            // Groups with many members need a larger buffer.
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // glibc says "not found" with 0 and no result; other NSS
            // modules with one of these.
            0 | libc::ENOENT | libc::ESRCH if found.is_null() => return Err(not_found()),
            0 => return Ok(grp.gr_gid),
            rc => {
                return Err(with_context(
                    io::Error::from_raw_os_error(rc),
                    format!("{option}: cannot look up group `{name}`"),
                ));
            }
        }
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
    /// Set after an accept failed for want of resources: wait before the next.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Accept failures that are about this moment, not the socket: out of
/// descriptors or memory, or a peer gone before we took its connection.
/// indymilter ends its accept loop (and the daemon stops) on any error it
/// sees, so these are retried here instead.
fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
        )
    ) || e.kind() == io::ErrorKind::ConnectionAborted
}

impl StoppableListener {
    pub fn new(inner: Listener, mut stop: watch::Receiver<bool>) -> Self {
        let stopped = Box::pin(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        Self {
            inner: Some(inner),
            stopped,
            backoff: None,
        }
    }
}

impl indymilter::Listener for StoppableListener {
    type Io = Stream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Stream>> {
        if self.inner.is_some() && self.stopped.as_mut().poll(cx).is_ready() {
            self.inner = None;
        }
        if let Some(wait) = self.backoff.as_mut() {
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        match &self.inner {
            Some(l) => match l.poll_accept(cx) {
                Poll::Ready(Err(e)) if accept_error_is_transient(&e) => {
                    tracing::warn!("milter: accept failed: {e}; retrying in 100 ms");
                    let mut wait = Box::pin(tokio::time::sleep(Duration::from_millis(100)));
                    // Registers the waker, so the retry comes by itself.
                    let _ = wait.as_mut().poll(cx);
                    self.backoff = Some(wait);
                    Poll::Pending
                }
                other => other,
            },
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
    /// A burst of connections larger than the old default backlog (128) is
    /// queued by the kernel, not dropped, while nothing accepts them yet.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = super::Listener::bind(
            &crate::config::ListenAddr::Inet {
                host: "127.0.0.1".into(),
                port: 0,
            },
            crate::config::SocketMode(0o666),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let addr = match listener.local_addr().unwrap_or_else(|e| panic!("{e}")) {
            crate::config::ListenAddr::Inet { host, port } => format!("{host}:{port}"),
            other => panic!("{other:?}"),
        };
        let connects: Vec<_> = (0..400)
            .map(|_| {
                let addr = addr.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(
                        std::time::Duration::from_millis(800),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                })
            })
            .collect();
        let mut held = Vec::new();
        for c in connects {
            match c.await.unwrap_or_else(|e| panic!("{e}")) {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => panic!("a connect waited for a SYN retry: the backlog is too short"),
            }
        }
        assert_eq!(held.len(), 400);
        drop(listener);
    }

    #[test]
    fn running_out_of_descriptors_does_not_end_the_milter_accept_loop() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ECONNABORTED] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(super::accept_error_is_transient(&e), "{e}");
        }
        let broken = std::io::Error::from_raw_os_error(libc::EBADF);
        assert!(!super::accept_error_is_transient(&broken));
    }

    #[test]
    fn groups_are_looked_up_by_name() {
        assert_eq!(super::group_id("x.socket_group", "root").ok(), Some(0));
        let e = super::group_id("milter.socket_group", "no-such-group-mxguard")
            .err()
            .unwrap_or_else(|| panic!("an unknown group was found"));
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "milter.socket_group: no group named `no-such-group-mxguard` on this host"
        );
    }

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
