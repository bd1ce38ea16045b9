//! `mosquitto` and `nats-server` processes, one per test, killed on drop (nats.rs `nats-server` harness style).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker that can be taken away and brought back on the same port.
pub trait Outage {
    /// Stops it gracefully (it saves its state).
    fn stop(&mut self);
    /// Starts it again on the same port, from its saved state.
    fn resume(&mut self);
}

impl Outage for Mosquitto {
    fn stop(&mut self) {
        Mosquitto::stop(self);
    }
    fn resume(&mut self) {
        Mosquitto::resume(self);
    }
}

impl Outage for NatsServer {
    fn stop(&mut self) {
        NatsServer::stop(self);
    }
    fn resume(&mut self) {
        NatsServer::resume(self);
    }
}

fn binary(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: install it with `apt-get install -y mosquitto nats-server`");
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn wait_for_port(port: u16, log: &Path) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("broker on port {port} not ready: {}", std::fs::read_to_string(log).unwrap_or_default());
}

fn freeze(child: &Option<Child>, frozen: bool) {
    if let Some(c) = child {
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let _ = Command::new("kill").args([signal, &c.id().to_string()]).status();
    }
}

fn stop(child: &mut Option<Child>, graceful: bool) {
    if let Some(mut c) = child.take() {
        if graceful {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A mosquitto broker with persistence in a private directory, so a graceful restart keeps sessions and
/// retained messages the way a production broker with `persistence true` does.
pub struct Mosquitto {
    /// The TCP port it listens on (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra listener options (TLS).
    listener_options: String,
}

impl Mosquitto {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a broker whose listener has these extra options (e.g. `cafile`, `certfile`, `keyfile`).
    pub fn start_with(listener_options: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = Self { port: free_port(), dir, child: None, listener_options: listener_options.into() };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let log = self.dir.path().join("mosquitto.log");
        let config = format!(
            // `user root`: started as root, mosquitto would otherwise switch to the `mosquitto` user and could
            // not write its log and persistence into this test's private directory (ignored when not root).
            "user root\nlistener {} 127.0.0.1\n{}\nallow_anonymous true\npersistence true\npersistence_location {}/\nlog_dest file {}\n",
            self.port,
            self.listener_options,
            self.dir.path().display(),
            log.display()
        );
        std::fs::write(&conf, config).expect("write mosquitto.conf");
        let child = Command::new(binary("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        wait_for_port(self.port, &log);
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Freezes (`true`, SIGSTOP) or thaws (`false`, SIGCONT) the broker: connections stay open, nothing moves.
    pub fn freeze(&self, frozen: bool) {
        freeze(&self.child, frozen);
    }

    /// Stops the broker with SIGTERM (it saves its state) and keeps the port for [`Mosquitto::resume`].
    pub fn stop(&mut self) {
        stop(&mut self.child, true);
    }

    /// Starts the broker again on the same port, from its saved state.
    pub fn resume(&mut self) {
        self.spawn();
    }

    /// Kills the broker with SIGKILL (it saves nothing) and keeps the port for [`Mosquitto::resume`].
    pub fn kill(&mut self) {
        stop(&mut self.child, false);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        stop(&mut self.child, false);
    }
}

/// A nats-server with JetStream, its port learnt from its log (`-p -1`), kept across restarts.
pub struct NatsServer {
    /// The client port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra command-line options (TLS).
    options: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a port it picks itself and waits until it says it is listening.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra command-line options (e.g. `--tlsverify`).
    pub fn start_with(options: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = options.iter().map(|o| o.to_string()).collect();
        let mut server = Self { port: 0, dir, child: None, options };
        server.spawn("-1");
        server
    }

    fn spawn(&mut self, port: &str) {
        let log = self.dir.path().join("nats.log");
        let _ = std::fs::remove_file(&log);
        let child = Command::new(binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.options)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                self.port = port;
                return wait_for_port(port, &log);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nats-server did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Freezes (`true`, SIGSTOP) or thaws (`false`, SIGCONT) the server: connections stay open, nothing moves.
    pub fn freeze(&self, frozen: bool) {
        freeze(&self.child, frozen);
    }

    /// Stops the server (SIGTERM); JetStream data stays for [`NatsServer::resume`].
    pub fn stop(&mut self) {
        stop(&mut self.child, true);
    }

    /// Kills the server with SIGKILL and keeps the port for [`NatsServer::resume`].
    pub fn kill(&mut self) {
        stop(&mut self.child, false);
    }

    /// Starts the server again on the same port with the same JetStream store.
    pub fn resume(&mut self) {
        let port = self.port.to_string();
        self.spawn(&port);
    }
}

fn listening_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("Listening for client connections on"))?;
    line.rsplit(':').next()?.trim().parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        stop(&mut self.child, false);
    }
}

/// A nats-server without JetStream (for `check`), on a port it picks itself.
pub struct PlainNatsServer {
    /// The client port.
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PlainNatsServer {
    /// Starts it and waits until it listens.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("nats.log");
        let child = Command::new(binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", "-1", "-l"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let mut server = Self { port: 0, _dir: dir, child: Some(child) };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(port) = listening_port(&std::fs::read_to_string(&log).unwrap_or_default()) {
                wait_for_port(port, &log);
                server.port = port;
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nats-server did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PlainNatsServer {
    fn drop(&mut self) {
        stop(&mut self.child, false);
    }
}

/// Three nats-servers with JetStream routed into one cluster on loopback ports; each can be killed and
/// restarted on its ports with its store.
pub struct NatsCluster {
    /// Client ports, one per node.
    pub ports: Vec<u16>,
    cluster_ports: Vec<u16>,
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream has a metadata leader.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = Self {
            ports: (0..3).map(|_| free_port()).collect(),
            cluster_ports: (0..3).map(|_| free_port()).collect(),
            dir,
            children: vec![None, None, None],
        };
        for node in 0..3 {
            cluster.spawn(node);
        }
        for node in 0..3 {
            wait_for_port(cluster.ports[node], &cluster.log_path(node));
        }
        cluster.wait_for_leader();
        cluster
    }

    fn log_path(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("n{node}.log"))
    }

    fn spawn(&mut self, node: usize) {
        let routes: Vec<String> = self.cluster_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        let child = Command::new(binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &self.ports[node].to_string(), "-js", "-n", &format!("n{node}")])
            .arg("-sd")
            .arg(self.dir.path().join(format!("js{node}")))
            .args(["--cluster_name", "fleet-test"])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", self.cluster_ports[node])])
            .args(["--routes", &routes.join(",")])
            .arg("-l")
            .arg(self.log_path(node))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.children[node] = Some(child);
    }

    fn wait_for_leader(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let led = (0..3).any(|n| {
                let log = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
                log.contains("JetStream cluster new metadata leader") || log.contains("new metadata leader")
            });
            if led {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no JetStream metadata leader: {}", std::fs::read_to_string(self.log_path(0)).unwrap_or_default());
    }

    /// Every node's URL, comma separated (as `nats.url` takes them).
    pub fn urls(&self) -> String {
        self.ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// SIGKILL one node.
    pub fn kill(&mut self, node: usize) {
        stop(&mut self.children[node], false);
    }

    /// Starts a killed node again on its ports with its store.
    pub fn restart(&mut self, node: usize) {
        self.spawn(node);
        wait_for_port(self.ports[node], &self.log_path(node));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            stop(child, false);
        }
    }
}
