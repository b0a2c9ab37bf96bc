//! Events for the manager and for a cluster's other coordinators, as the original
//! platform sends them: anycast entries on a Redis stream (`XADD … MAXLEN ~ 128`) and
//! broadcasts on a channel, in the current JSON envelope, the legacy msgpack one
//! (`args`) or both (`[health_check] event_envelope`).
//!
//! Streams and channels: the App-Proxy's own (`events-appproxy`, e.g. `worker_lost`)
//! and the manager's (`events` / `events_all`, e.g. `model_service_status_updated`),
//! on the configured Redis.

use appproxy_shared::model::{EventMetadata, RequestIdText};
use serde_json::Value;

use crate::config::EventEnvelope;

/// The App-Proxy's anycast stream.
pub const APPPROXY_STREAM: &str = "events-appproxy";
/// The manager's anycast stream (the original's core event producer).
pub const MANAGER_STREAM: &str = "events";
/// The manager's broadcast channel.
pub const MANAGER_CHANNEL: &str = "events_all";
/// The `source` of everything the coordinator sends.
pub const SOURCE: &str = "appproxy-coordinator";
/// Stream length kept (approximately), as the original.
const MAXLEN: u64 = 128;

/// One event: its name, the JSON body of the current envelope and the positional
/// arguments of the legacy one.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name (`worker_lost`, `model_service_status_updated`, …).
    pub name: &'static str,
    /// The body of the JSON envelope.
    pub body: Value,
    /// The legacy envelope's positional array (strings or null).
    pub args: Vec<Option<String>>,
}

impl Event {
    /// The stream entry's fields for `envelope`, metadata carrying `request_id`.
    pub fn fields(
        &self,
        envelope: EventEnvelope,
        request_id: Option<appproxy_shared::RequestId>,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = vec![
            ("name", self.name.as_bytes().to_vec()),
            ("source", SOURCE.as_bytes().to_vec()),
        ];
        if envelope != EventEnvelope::Legacy {
            let meta = EventMetadata {
                request_id: request_id.map(RequestIdText::from),
                ..Default::default()
            };
            out.push(("payload", self.body.to_string().into_bytes()));
            out.push((
                "metadata",
                serde_json::to_string(&meta)
                    .unwrap_or_else(|_| "{}".into())
                    .into_bytes(),
            ));
        }
        if envelope != EventEnvelope::Json {
            out.push(("args", msgpack_array(&self.args)));
        }
        out
    }

    /// The broadcast message (JSON envelope; `args` as base64 of msgpack added for
    /// the legacy forms).
    pub fn broadcast(
        &self,
        envelope: EventEnvelope,
        request_id: Option<appproxy_shared::RequestId>,
    ) -> String {
        let mut msg = serde_json::Map::new();
        for (k, v) in self.fields(envelope, request_id) {
            let v = if k == "args" {
                Value::String(base64_encode(&v))
            } else {
                Value::String(String::from_utf8_lossy(&v).into_owned())
            };
            msg.insert(k.to_owned(), v);
        }
        Value::Object(msg).to_string()
    }
}

/// `XADD stream MAXLEN ~ 128 * …` under the current request ID; false (logged) when
/// Redis refused or did not answer in time.
pub async fn xadd(
    conn: &crate::redis_link::RedisConn,
    stream: &str,
    event: &Event,
    envelope: EventEnvelope,
) -> bool {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("MAXLEN").arg("~").arg(MAXLEN).arg("*");
    for (k, v) in event.fields(envelope, appproxy_shared::current_request_id()) {
        cmd.arg(k).arg(v);
    }
    let mut conn = conn.clone();
    match super::bounded(cmd.query_async::<String>(&mut conn)).await {
        Ok(_) => {
            tracing::info!(event = event.name, %stream, "anycast event sent");
            true
        }
        Err(e) => {
            tracing::warn!(event = event.name, %stream, error = %e, "anycast event not sent");
            false
        }
    }
}

/// `PUBLISH channel <envelope>`; false (logged) on failure.
pub async fn publish(
    conn: &crate::redis_link::RedisConn,
    channel: &str,
    event: &Event,
    envelope: EventEnvelope,
) -> bool {
    let text = event.broadcast(envelope, appproxy_shared::current_request_id());
    let mut conn = conn.clone();
    match super::bounded(
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(text)
            .query_async::<i64>(&mut conn),
    )
    .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(event = event.name, %channel, error = %e, "broadcast event not sent");
            false
        }
    }
}

/// msgpack of an array of strings / nils (what the legacy envelope's `args` hold
/// for these events).
pub fn msgpack_array(items: &[Option<String>]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = items.len();
    if n < 16 {
        out.push(0x90 | n as u8);
    } else {
        out.push(0xdc);
        out.extend_from_slice(&(n.min(u16::MAX as usize) as u16).to_be_bytes());
    }
    for item in items.iter().take(u16::MAX as usize) {
        let Some(s) = item else {
            out.push(0xc0);
            continue;
        };
        let b = s.as_bytes();
        match b.len() {
            l if l < 32 => out.push(0xa0 | l as u8),
            l if l < 256 => out.extend_from_slice(&[0xd9, l as u8]),
            l if l < 65536 => {
                out.push(0xda);
                out.extend_from_slice(&(l as u16).to_be_bytes());
            }
            l => {
                out.push(0xdb);
                out.extend_from_slice(&(l.min(u32::MAX as usize) as u32).to_be_bytes());
            }
        }
        out.extend_from_slice(b);
    }
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The original's `worker_lost` (anycast on `events-appproxy`): the leader found the
/// worker's heartbeat older than the timeout.
pub fn worker_lost(authority: &str, reason: &str) -> Event {
    Event {
        name: "worker_lost",
        body: serde_json::json!({"worker_id": authority, "reason": reason}),
        args: vec![Some(authority.to_owned()), Some(reason.to_owned())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msgpack_of_strings_and_nil() {
        assert_eq!(
            msgpack_array(&[Some("w1".into()), None]),
            vec![0x92, 0xa2, b'w', b'1', 0xc0]
        );
        let long = "x".repeat(40);
        let packed = msgpack_array(&[Some(long.clone())]);
        assert_eq!(&packed[..3], &[0x91, 0xd9, 40]);
        assert_eq!(&packed[3..], long.as_bytes());
        let many: Vec<Option<String>> = (0..20).map(|_| None).collect();
        assert_eq!(&msgpack_array(&many)[..3], &[0xdc, 0, 20]);
    }

    #[test]
    fn envelopes() {
        let e = worker_lost("w1", "heartbeat timeout");
        let json = e.fields(EventEnvelope::Json, None);
        let names: Vec<&str> = json.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["name", "source", "payload", "metadata"]);
        let payload: Value = serde_json::from_slice(&json[2].1).expect("json");
        assert_eq!(
            payload,
            serde_json::json!({"worker_id": "w1", "reason": "heartbeat timeout"})
        );
        let legacy = e.fields(EventEnvelope::Legacy, None);
        assert_eq!(legacy.len(), 3);
        assert_eq!(legacy[2].0, "args");
        assert_eq!(&legacy[2].1[..4], &[0x92, 0xa2, b'w', b'1']);
        assert_eq!(e.fields(EventEnvelope::Both, None).len(), 5);
        let b: Value = serde_json::from_str(&e.broadcast(EventEnvelope::Both, None)).expect("b");
        assert_eq!(b["name"], "worker_lost");
        assert!(b["payload"].is_string() && b["metadata"].is_string());
        assert_eq!(b["args"], base64_encode(&legacy[2].1));
        assert_eq!(
            base64_encode(b"any carnal pleas"),
            "YW55IGNhcm5hbCBwbGVhcw=="
        );
        assert_eq!(
            base64_encode(b"any carnal pleasu"),
            "YW55IGNhcm5hbCBwbGVhc3U="
        );
    }
}
