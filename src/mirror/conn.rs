//! [`Conn`]: a `redis` crate connection with the address it talks to and a deadline
//! for every operation, so that every error names the server and nothing waits
//! forever; and [`fetch`], the one-shot read used to restore a session.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};

use super::error::{show, MirrorError};
use super::record::{check_room, hash_record, room_key, MirrorRecord};
use super::url::RedisUrl;

/// A connection (`MultiplexedConnection` by default; the mirror task uses a
/// `ConnectionManager`) whose every operation through [`Conn::query`] and the
/// module's functions ends within `timeout` — waiting for a reconnect included.
///
/// It is also a [`ConnectionLike`], so any `redis` command or pipeline runs on it
/// directly (without the deadline and the error mapping).
#[derive(Clone)]
pub struct Conn<C = MultiplexedConnection> {
    inner: C,
    addr: String,
    timeout: Duration,
}

impl Conn {
    /// Connect (TCP, TLS, AUTH, SELECT), all within `timeout`; commands then time out
    /// after `timeout` each.
    pub async fn connect(url: &RedisUrl, timeout: Duration) -> Result<Conn, MirrorError> {
        let client = url.client()?;
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let addr = url.addr();
        let work = client.get_multiplexed_async_connection_with_config(&cfg);
        let inner = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(MirrorError::from_redis(e, &addr, "the connection", timeout)),
            Err(_) => {
                return Err(MirrorError::Timeout {
                    addr,
                    what: "the connection (TCP, TLS, AUTH, SELECT)".into(),
                    after: timeout,
                })
            }
        };
        Ok(Conn {
            inner,
            addr,
            timeout,
        })
    }
}

impl<C: ConnectionLike> Conn<C> {
    /// Wrap a connection to `addr` (for messages) with a per-operation deadline.
    pub fn new(inner: C, addr: impl Into<String>, timeout: Duration) -> Conn<C> {
        Conn {
            inner,
            addr: addr.into(),
            timeout,
        }
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The per-operation deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The wrapped connection.
    pub fn inner(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Run one command within the deadline. An error reply is
    /// [`MirrorError::Server`]; the reply itself is returned as it came.
    pub async fn query(&mut self, cmd: &Cmd) -> Result<Value, MirrorError> {
        let name = cmd_name(cmd);
        self.run(&name, async |c| cmd.query_async::<Value>(c).await)
            .await
    }

    /// Run a pipeline within the deadline; with `ignore_errors` set on it, each
    /// command's error reply is a `Value::ServerError` in its slot.
    pub async fn query_pipeline(
        &mut self,
        what: &str,
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, MirrorError> {
        self.run(what, async |c| pipe.query_async::<Vec<Value>>(c).await)
            .await
    }

    /// PING → PONG.
    pub async fn ping(&mut self) -> Result<(), MirrorError> {
        match self.query(&redis::cmd("PING")).await? {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            v => Err(MirrorError::bad_reply(
                &self.addr,
                "PING",
                super::error::describe(&v),
            )),
        }
    }

    /// `f` on the inner connection, within the deadline, errors mapped.
    pub(crate) async fn run<T>(
        &mut self,
        what: &str,
        f: impl AsyncFnOnce(&mut C) -> redis::RedisResult<T>,
    ) -> Result<T, MirrorError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, f(&mut self.inner)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(MirrorError::from_redis(e, &self.addr, what, timeout)),
            Err(_) => Err(MirrorError::Timeout {
                addr: self.addr.clone(),
                what: what.to_string(),
                after: timeout,
            }),
        }
    }
}

/// The command's name, upper case, for messages.
fn cmd_name(cmd: &Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(a)) => show(a).to_ascii_uppercase(),
        _ => "a command".into(),
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Conn<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// For restore: read the room's record (None if absent), within `timeout` in all
/// (connect included). Errors are returned, never panics; the record is validated.
pub async fn fetch(
    url: &RedisUrl,
    room: &str,
    timeout: Duration,
) -> Result<Option<MirrorRecord>, MirrorError> {
    check_room(room).map_err(MirrorError::InvalidRecord)?;
    let work = async {
        let mut c = Conn::connect(url, timeout).await?;
        let v = c.query(redis::cmd("HGETALL").arg(room_key(room))).await?;
        Ok(hash_record(room, c.addr(), v)?.map(|(rec, _)| rec))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(MirrorError::Timeout {
            addr: url.addr(),
            what: "the fetch (connect, AUTH, SELECT, HGETALL)".into(),
            after: timeout,
        }),
    }
}
