//! A throwaway `redis-server` on loopback for the tests that need a real one, and a
//! child process that is killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Kill {
    /// SIGKILL now: no goodbye, no flush.
    pub fn kill9(self) {
        drop(self);
    }
}

/// `redis-server` on 127.0.0.1:`port`, without persistence, once it accepts connections.
pub fn redis_server(port: u16) -> Kill {
    let c = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is not installed: run scripts/test (it installs the Debian package redis-server)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Kill(c)
}
