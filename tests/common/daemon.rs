//! Launching `bandsync run` under test: one builder with the defaults every daemon
//! test shares, and a tiny HTTP client for `/health`.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bandsync");

/// Test hooks the daemon reads from its environment. [`NodeCmd`] never lets them leak
/// in from the test runner's environment; a test that wants one sets it with
/// [`NodeCmd::env`].
pub const TEST_ENV: [&str; 3] = [
    "BANDSYNC_TEST_CLOCK",
    "BANDSYNC_TEST_IMPAIR",
    "BANDSYNC_TEST_FREEZE_AFTER_MS",
];

enum Stderr {
    Null,
    Piped,
    File { path: PathBuf, append: bool },
}

/// `bandsync run --audio null --interface lo --quic 127.0.0.1:0 --http 127.0.0.1:0
/// --state-dir DIR`, stdout to /dev/null, stderr to /dev/null, the [`TEST_ENV`] hooks
/// removed. Setters replace a default or add to the command line; `spawn` starts it.
pub struct NodeCmd {
    bin: OsString,
    state_dir: PathBuf,
    interface: String,
    quic: Option<String>,
    http: Option<String>,
    room: Option<String>,
    name: Option<String>,
    key: Option<PathBuf>,
    click_log: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    stderr: Stderr,
}

impl NodeCmd {
    pub fn new(state_dir: impl AsRef<Path>) -> NodeCmd {
        NodeCmd {
            bin: BIN.into(),
            state_dir: state_dir.as_ref().to_path_buf(),
            interface: "lo".into(),
            quic: Some("127.0.0.1:0".into()),
            http: Some("127.0.0.1:0".into()),
            room: None,
            name: None,
            key: None,
            click_log: None,
            args: Vec::new(),
            env: Vec::new(),
            stderr: Stderr::Null,
        }
    }

    /// Another binary (e.g. a release build for a benchmark).
    pub fn bin(mut self, bin: impl AsRef<OsStr>) -> Self {
        self.bin = bin.as_ref().to_owned();
        self
    }
    /// `--interface NAME` instead of `lo`.
    pub fn interface(mut self, name: &str) -> Self {
        self.interface = name.into();
        self
    }
    /// `--quic ADDR:PORT` instead of `127.0.0.1:0`.
    pub fn quic(mut self, addr: &str) -> Self {
        self.quic = Some(addr.into());
        self
    }
    /// `--quic 127.0.0.1:PORT`.
    pub fn quic_port(self, port: u16) -> Self {
        self.quic(&format!("127.0.0.1:{port}"))
    }
    /// `--http ADDR:PORT` instead of `127.0.0.1:0`.
    pub fn http(mut self, addr: &str) -> Self {
        self.http = Some(addr.into());
        self
    }
    /// `--http 127.0.0.1:PORT`.
    pub fn http_port(self, port: u16) -> Self {
        self.http(&format!("127.0.0.1:{port}"))
    }
    /// No `--http` flag: the daemon's own default (0.0.0.0:8080).
    pub fn no_http(mut self) -> Self {
        self.http = None;
        self
    }
    /// `--room NAME`.
    pub fn room(mut self, room: &str) -> Self {
        self.room = Some(room.into());
        self
    }
    /// `--name NAME`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }
    /// `--room-key-file PATH`.
    pub fn key_file(mut self, path: impl AsRef<Path>) -> Self {
        self.key = Some(path.as_ref().to_path_buf());
        self
    }
    /// `--click-log PATH`.
    pub fn click_log(mut self, path: impl AsRef<Path>) -> Self {
        self.click_log = Some(path.as_ref().to_path_buf());
        self
    }
    /// One more argument, after the builder's own.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }
    /// More arguments, after the builder's own.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    /// Set an environment variable (also one of the [`TEST_ENV`] hooks).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), Some(v.as_ref().to_owned())));
        self
    }
    /// Set several environment variables.
    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }
    /// Remove an environment variable the daemon would inherit.
    pub fn env_remove(mut self, k: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), None));
        self
    }
    /// stderr into a fresh file (truncated).
    pub fn stderr_to(mut self, path: impl AsRef<Path>) -> Self {
        self.stderr = Stderr::File {
            path: path.as_ref().to_path_buf(),
            append: false,
        };
        self
    }
    /// stderr appended to a file (created if missing): one log across restarts.
    pub fn stderr_append(mut self, path: impl AsRef<Path>) -> Self {
        self.stderr = Stderr::File {
            path: path.as_ref().to_path_buf(),
            append: true,
        };
        self
    }
    /// stderr piped, for `Child::wait_with_output`.
    pub fn stderr_piped(mut self) -> Self {
        self.stderr = Stderr::Piped;
        self
    }

    /// The command line and environment, ready to spawn.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["run", "--audio", "null", "--interface"])
            .arg(&self.interface);
        for (flag, v) in [("--quic", &self.quic), ("--http", &self.http)] {
            if let Some(v) = v {
                c.arg(flag).arg(v);
            }
        }
        for (flag, v) in [("--room", &self.room), ("--name", &self.name)] {
            if let Some(v) = v {
                c.arg(flag).arg(v);
            }
        }
        if let Some(k) = &self.key {
            c.arg("--room-key-file").arg(k);
        }
        c.arg("--state-dir").arg(&self.state_dir);
        if let Some(l) = &self.click_log {
            c.arg("--click-log").arg(l);
        }
        // HTTPS on a free loopback port unless the test says otherwise (the default,
        // 0.0.0.0:8443, would be shared by every daemon of the test run).
        if !self.args.iter().any(|a| a == "--https") {
            c.arg("--https").arg("127.0.0.1:0");
        }
        c.args(&self.args);
        for k in TEST_ENV {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.stdout(Stdio::null());
        match &self.stderr {
            Stderr::Null => c.stderr(Stdio::null()),
            Stderr::Piped => c.stderr(Stdio::piped()),
            Stderr::File { path, append } => c.stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(*append)
                    .truncate(!*append)
                    .open(path)
                    .unwrap_or_else(|e| panic!("log file {}: {e}", path.display())),
            ),
        };
        c
    }

    pub fn spawn(&self) -> Child {
        self.command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.bin))
    }
}

/// A plain HTTP/1.1 GET on loopback: (status code, body); `None` while nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The outermost JSON object of a body (tolerates chunked encoding).
pub fn json_body(body: &str) -> serde_json::Value {
    let a = body.find('{').expect("a JSON object");
    let b = body.rfind('}').expect("a JSON object");
    serde_json::from_str(&body[a..=b]).unwrap()
}

/// Wait until the node on `http_port` answers `/health`; false after `timeout`.
pub fn wait_health(http_port: u16, timeout: Duration) -> bool {
    let t = Instant::now();
    loop {
        if http_get(http_port, "/health").is_some() {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
