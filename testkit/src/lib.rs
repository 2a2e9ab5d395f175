//! What several crates' tests need alike, kept in one place: a real `nats-server -js` on
//! loopback (the registry's NATS store, node sync from JetStream, the DNS on NATS, and the
//! cluster end to end all start one), fuzzing helpers, and hand-written guests.

pub mod fuzz;
pub mod guests;
pub mod origin;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long nats-server gets to say where it listens.
const STARTUP: Duration = Duration::from_secs(30);

/// A `nats-server -js` on 127.0.0.1. Killed and reaped when dropped.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    /// The JetStream directory, when the server owns it.
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// A server on a free port with its JetStream files in a temporary directory.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut server = NatsServer::start_in(dir.path(), None);
        server._dir = Some(dir);
        server
    }

    /// A server with its JetStream files in `dir` (kept across restarts), on `port`
    /// (`None`: a free one, read from the server's log).
    pub fn start_in(dir: &Path, port: Option<u16>) -> NatsServer {
        let port_arg = port.map_or_else(|| "-1".to_string(), |port| port.to_string());
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server is installed (apt-get install nats-server)");
        let stderr = child.stderr.take().expect("piped stderr");
        let (found, address) = mpsc::channel();
        std::thread::spawn(move || {
            let needle = "Listening for client connections on ";
            // Keep draining so the server never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find(needle) {
                    let _ = found.send(line[at + needle.len()..].trim().to_string());
                }
            }
        });
        let address: String = address
            .recv_timeout(STARTUP)
            .expect("nats-server printed its client address");
        let port = address
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the client address ends with a port");
        NatsServer {
            child,
            url: format!("nats://{address}"),
            port,
            _dir: None,
        }
    }

    /// Stops the server now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
