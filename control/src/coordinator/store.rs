//! The circuit store, embedded SQLite: workers, circuits (with the nullable
//! `origin_request_id` of the request that created them) and `/v2/conf` tokens.
//! Versioned migrations run at start (`PRAGMA user_version`).
//!
//! Calls are synchronous; the API runs them on tokio's blocking pool.

use std::path::Path;
use std::sync::Mutex;

use appproxy_shared::model::Circuit;
use rusqlite::{params, Connection, OptionalExtension};

/// Migrations, applied in order; the database records how many ran.
const MIGRATIONS: &[&str] = &["
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    authority TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ALIVE',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE circuits (
    id TEXT PRIMARY KEY,
    worker TEXT NOT NULL REFERENCES workers(id),
    port INTEGER,
    subdomain TEXT,
    body TEXT NOT NULL,
    origin_request_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX circuits_worker_port ON circuits(worker, port) WHERE port IS NOT NULL;
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"];

/// A worker row: ID, registration body, status, created and updated times.
pub type WorkerRow = (uuid::Uuid, serde_json::Value, String, String, String);

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored JSON body did not parse.
    #[error("stored data: {0}")]
    Data(#[from] serde_json::Error),
    /// The connection lock was poisoned by a panic elsewhere.
    #[error("database lock poisoned")]
    Poisoned,
}

/// The embedded store.
pub struct Store {
    /// One connection; SQLite serialises writers anyway.
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(migration = i + 1, "store migrated");
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&conn)
    }

    /// Inserts or updates a worker by authority; returns its ID.
    pub fn upsert_worker(
        &self,
        authority: &str,
        body: &serde_json::Value,
        now: &str,
    ) -> Result<uuid::Uuid, StoreError> {
        self.with(|c| {
            let existing: Option<String> = c
                .query_row("SELECT id FROM workers WHERE authority = ?1", params![authority], |r| r.get(0))
                .optional()?;
            let id = match existing {
                Some(id) => {
                    c.execute(
                        "UPDATE workers SET body = ?1, status = 'ALIVE', updated_at = ?2 WHERE id = ?3",
                        params![body.to_string(), now, id],
                    )?;
                    id
                }
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    c.execute(
                        "INSERT INTO workers (id, authority, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                        params![id, authority, body.to_string(), now],
                    )?;
                    id
                }
            };
            Ok(uuid::Uuid::parse_str(&id).unwrap_or_default())
        })
    }

    /// Marks a heartbeat.
    pub fn heartbeat(&self, id: &uuid::Uuid, now: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE workers SET updated_at = ?1, status = 'ALIVE' WHERE id = ?2",
                params![now, id.to_string()],
            )? == 1)
        })
    }

    /// Every worker: (id, body, status, created, updated).
    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, body, status, created_at, updated_at FROM workers ORDER BY authority",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, body, status, created, updated) = row?;
                out.push((
                    uuid::Uuid::parse_str(&id).unwrap_or_default(),
                    serde_json::from_str(&body)?,
                    status,
                    created,
                    updated,
                ));
            }
            Ok(out)
        })
    }

    /// Ports in use on a worker.
    pub fn used_ports(&self, worker: &uuid::Uuid) -> Result<Vec<u16>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT port FROM circuits WHERE worker = ?1 AND port IS NOT NULL")?;
            let rows = st.query_map(params![worker.to_string()], |r| r.get::<_, i64>(0))?;
            let mut out = Vec::new();
            for p in rows {
                out.push(p? as u16);
            }
            Ok(out)
        })
    }

    /// Stores a circuit with the ID of the request that created it (or none).
    pub fn insert_circuit(
        &self,
        circuit: &Circuit,
        origin_request_id: Option<&str>,
        now: &str,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(circuit)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO circuits (id, worker, port, subdomain, body, origin_request_id, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![
                    circuit.id.to_string(),
                    circuit.worker.map(|w| w.to_string()).unwrap_or_default(),
                    circuit.port.map(i64::from),
                    circuit.subdomain,
                    body,
                    origin_request_id,
                    now
                ],
            )?;
            Ok(())
        })
    }

    /// A circuit and its origin request ID.
    pub fn circuit(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<(Circuit, Option<String>)>, StoreError> {
        self.with(|c| {
            let row: Option<(String, Option<String>)> = c
                .query_row(
                    "SELECT body, origin_request_id FROM circuits WHERE id = ?1",
                    params![id.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            match row {
                Some((body, origin)) => Ok(Some((serde_json::from_str(&body)?, origin))),
                None => Ok(None),
            }
        })
    }

    /// The circuits of a worker, each with its `origin_request_id`.
    pub fn circuits_of(
        &self,
        worker: &uuid::Uuid,
    ) -> Result<Vec<(Circuit, Option<String>)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT body, origin_request_id FROM circuits WHERE worker = ?1 ORDER BY created_at",
            )?;
            let rows = st.query_map(params![worker.to_string()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (b, origin) = row?;
                out.push((serde_json::from_str(&b)?, origin));
            }
            Ok(out)
        })
    }

    /// Deletes a circuit; false when there was none.
    pub fn delete_circuit(&self, id: &uuid::Uuid) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM circuits WHERE id = ?1",
                params![id.to_string()],
            )? == 1)
        })
    }

    /// Stores a `/v2/conf` token.
    pub fn insert_token(
        &self,
        id: &uuid::Uuid,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, body) VALUES (?1, ?2)",
                params![id.to_string(), body.to_string()],
            )?;
            Ok(())
        })
    }

    /// A `/v2/conf` token.
    pub fn token(&self, id: &uuid::Uuid) -> Result<Option<serde_json::Value>, StoreError> {
        self.with(|c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM tokens WHERE id = ?1",
                    params![id.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(match body {
                Some(b) => Some(serde_json::from_str(&b)?),
                None => None,
            })
        })
    }
}
