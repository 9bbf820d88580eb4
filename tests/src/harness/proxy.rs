//! A TCP proxy in front of a PostgreSQL Unix socket that can damage what the server sends:
//! [`PgProxy`] listens on 127.0.0.1 (a port the kernel picked) and relays each connection
//! to the socket; with a marker set, it flips one bit of the first occurrence of that
//! marker in the server-to-client bytes (once per proxy). A marker stored in a table's
//! rows is thus damaged inside that relation file's data in the BASE_BACKUP COPY stream,
//! the way a faulty NIC or middlebox would, while every protocol header stays intact.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running proxy; stops when dropped.
pub struct PgProxy {
    port: u16,
    flipped: Arc<AtomicBool>,
    relayed: Arc<AtomicU64>,
    cut: Arc<Cut>,
    _runtime: tokio::runtime::Runtime,
}

/// A connection to cut after so many bytes from the server (0: none), once.
#[derive(Default)]
struct Cut {
    after: AtomicU64,
    done: AtomicBool,
}

impl PgProxy {
    /// A proxy to the PostgreSQL socket `<sock_dir>/.s.PGSQL.<port>`. With `flip_marker`,
    /// the first occurrence of those bytes within one read from the server has one bit of
    /// its middle byte flipped.
    pub fn start(sock_dir: &Path, pg_port: u16, flip_marker: Option<&[u8]>) -> PgProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the proxy");
        let socket = sock_dir.join(format!(".s.PGSQL.{pg_port}"));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("proxy listens on 127.0.0.1");
        let port = listener.local_addr().expect("proxy address").port();
        let flipped = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(AtomicU64::new(0));
        let marker = flip_marker.map(<[u8]>::to_vec);
        let cut = Arc::new(Cut::default());
        let (f, r, c) = (flipped.clone(), relayed.clone(), cut.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (socket, marker, f, r, c) = (
                    socket.clone(),
                    marker.clone(),
                    f.clone(),
                    r.clone(),
                    c.clone(),
                );
                tokio::spawn(async move {
                    let _ = relay(client, socket, marker, f, r, c).await;
                });
            }
        });
        PgProxy {
            port,
            flipped,
            relayed,
            cut,
            _runtime: runtime,
        }
    }

    /// Makes the next connection that receives more than `after` bytes from the server
    /// end there, in the middle of whatever message those bytes belong to (once).
    pub fn cut_after(&self, after: u64) {
        self.cut.after.store(after, Ordering::SeqCst);
    }

    /// Whether a connection was cut.
    pub fn was_cut(&self) -> bool {
        self.cut.done.load(Ordering::SeqCst)
    }

    /// The TCP port clients connect to (host 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the marker was seen and damaged.
    pub fn flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }

    /// Bytes relayed from the server so far.
    pub fn relayed_from_server(&self) -> u64 {
        self.relayed.load(Ordering::SeqCst)
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    socket: PathBuf,
    marker: Option<Vec<u8>>,
    flipped: Arc<AtomicBool>,
    relayed: Arc<AtomicU64>,
    cut: Arc<Cut>,
) -> std::io::Result<()> {
    let server = tokio::net::UnixStream::connect(&socket).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    // Server to client. A marker split across two reads is not seen: the marker is
    // meant to be in many rows, and never holding bytes back keeps the exchange live.
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        let n = sr.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let after = cut.after.load(Ordering::SeqCst);
        if after > 0 && sent + n as u64 > after && !cut.done.swap(true, Ordering::SeqCst) {
            cw.write_all(&buf[..(after - sent) as usize]).await?;
            up.abort();
            return Ok(());
        }
        sent += n as u64;
        let data = &mut buf[..n];
        if let Some(m) = &marker {
            if !flipped.load(Ordering::SeqCst) {
                if let Some(at) = data.windows(m.len()).position(|w| w == m.as_slice()) {
                    if !flipped.swap(true, Ordering::SeqCst) {
                        data[at + m.len() / 2] ^= 0x10;
                    }
                }
            }
        }
        cw.write_all(data).await?;
        relayed.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = cw.shutdown().await;
    up.abort();
    Ok(())
}
