//! A minimal QMP client for the node's own qemu-storage-daemon child: one connection, one
//! command at a time, events kept until asked for.
//!
//! The child is ours and its socket is in the node's private run directory, but its answers
//! are still bounded (line length) and checked (ids, shapes) before use.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line read.
pub const MAX_LINE: u64 = 1 << 20;
/// Time allowed for one command's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// QMP's error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("qmp connection closed")]
    Closed,
    #[error("qmp line longer than {MAX_LINE} bytes or not JSON")]
    BadLine,
    #[error("qmp greeting missing")]
    NoGreeting,
    #[error("qmp command {command} failed ({class:?})")]
    Command {
        command: &'static str,
        class: QmpClass,
    },
    #[error("qmp timed out waiting for {0}")]
    Timeout(&'static str),
}

/// One QMP connection.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path).await?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, q.read_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting"))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NoGreeting);
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_line(&mut self) -> Result<Value, QmpError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if buf.last() != Some(&b'\n') {
            return Err(QmpError::BadLine);
        }
        serde_json::from_slice(&buf).map_err(|_| QmpError::BadLine)
    }

    /// Runs `command` with `args`; returns its `return` value.
    pub async fn execute(&mut self, command: &'static str, args: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            serde_json::to_vec(&json!({"execute": command, "arguments": args, "id": id}))
                .map_err(|_| QmpError::BadLine)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let v = self.read_line().await?;
                if v.get("event").is_some() {
                    self.events.push_back(v);
                    continue;
                }
                if v.get("id").and_then(Value::as_u64) == Some(id) {
                    return Ok::<Value, QmpError>(v);
                }
                // An answer to no question of ours: not possible on a private connection.
                return Err(QmpError::BadLine);
            }
        })
        .await
        .map_err(|_| QmpError::Timeout(command))??;
        if let Some(r) = answer.get("return") {
            return Ok(r.clone());
        }
        let err = answer.get("error");
        let class = match err.and_then(|e| e.get("class")).and_then(Value::as_str) {
            Some("GenericError") => QmpClass::GenericError,
            Some("CommandNotFound") => QmpClass::CommandNotFound,
            Some("DeviceNotFound") => QmpClass::DeviceNotFound,
            _ => QmpClass::Other,
        };
        let desc = err
            .and_then(|e| e.get("desc"))
            .and_then(Value::as_str)
            .unwrap_or("");
        tracing::debug!(command, ?class, desc, "qmp command failed");
        Err(QmpError::Command { command, class })
    }

    /// Waits for event `name` whose `data` satisfies `pred` (events already received count).
    pub async fn wait_event(
        &mut self,
        name: &'static str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let matches = |v: &Value| {
            v.get("event").and_then(Value::as_str) == Some(name)
                && pred(v.get("data").unwrap_or(&Value::Null))
        };
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i).ok_or(QmpError::Closed);
        }
        tokio::time::timeout(timeout, async {
            loop {
                let v = self.read_line().await?;
                if matches(&v) {
                    return Ok(v);
                }
                if v.get("event").is_some() {
                    self.events.push_back(v);
                }
                if self.events.len() > 1024 {
                    self.events.pop_front();
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout(name))?
    }
}
